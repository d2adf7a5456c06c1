"""Building teachers (and checking data) before the student exists leaves every random generator as it was: the
context manager itself, distill()'s setup, and a recipe's teacher build."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from composer_kd.models.rng import preserved_rng


def generator_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def assert_same_states(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0]), 'torch'
    assert before[1] == after[1], 'random'
    assert np.array_equal(before[2], after[2]), 'numpy'


def seed(value: int) -> None:
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


def test_every_generator_is_given_back_even_on_error():
    seed(0)
    before = generator_states()
    with preserved_rng():
        torch.nn.Linear(8, 8)
        random.random()
        np.random.rand(3)
    assert_same_states(before, generator_states())
    with pytest.raises(RuntimeError, match='inside'):
        with preserved_rng():
            torch.rand(4)
            raise RuntimeError('inside')
    assert_same_states(before, generator_states())


def test_distills_setup_leaves_the_generators_as_the_callers_seed_left_them(monkeypatch):
    import composer_kd.run.api as api

    class Reached(Exception):
        pass

    seen = []

    def train_and_report(*args, **kwargs):
        seen.append(generator_states())
        raise Reached

    monkeypatch.setattr(api, '_train_and_report', train_and_report)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    student = torch.nn.Linear(8, 3)
    seed(3)
    before = generator_states()
    with pytest.raises(Reached):
        api.distill(teacher, student, TensorDataset(x, y), TensorDataset(x, y), device='cpu')
    assert_same_states(before, seen[0])


def test_a_recipes_teacher_build_gives_the_generators_back(monkeypatch):
    import composer_kd.recipes.build as build
    from composer_kd.recipes import load_recipe

    states = []
    seed_all = build.reproducibility.seed_all

    def recording_seed_all(value):
        states.append(generator_states())  # as the generators are just before each seeding
        seed_all(value)

    monkeypatch.setattr(build.reproducibility, 'seed_all', recording_seed_all)
    build.build_run(load_recipe('digits', ['progress_bar=false', 'device=cpu']))
    # Seeded for the teacher, then for the student: the teacher's build left nothing behind.
    teacher_seeded, student_seeded = states[:2]
    assert_same_states(teacher_seeded, student_seeded)
