"""A recipe's ``distillation.on_policy`` section: checked key by key, refused with a reason where it cannot run,
and built into the ``OnPolicy`` of the recipe's ``Distillation``."""

from __future__ import annotations

import pytest
import torch

from composer_kd import OnPolicy
from composer_kd.recipes import check_recipe, load_recipe
from composer_kd.recipes.components import build_distillation
from composer_kd.recipes.loader import RecipeError


def problems(*overrides: str) -> list[str]:
    return [p for p in check_recipe(load_recipe('digits', list(overrides))) if p.startswith('distillation.on_policy')]


def test_every_option_reaches_the_distillation():
    recipe = load_recipe(
        'digits',
        [
            'distillation.on_policy.fraction=0.5',
            'distillation.on_policy.source=teacher',
            'distillation.on_policy.max_new_tokens=16',
            'distillation.on_policy.temperature=0.7',
            'distillation.on_policy.prompt_length_key=n_prompt',
            'distillation.on_policy.pad_token_id=0',
            'distillation.on_policy.cache_teacher_sequences=true',
            'distillation.loss=gjsd',
            'distillation.temperature=1.0',
        ],
    )
    distillation = build_distillation(recipe, [torch.nn.Linear(64, 10)])
    assert distillation.on_policy == OnPolicy(
        fraction=0.5,
        source='teacher',
        max_new_tokens=16,
        temperature=0.7,
        prompt_length_key='n_prompt',
        pad_token_id=0,
        cache_teacher_sequences=True,
    )
    assert type(distillation.kd_loss_fn).__name__ == 'GeneralizedJSD' and distillation.kd_loss_fn.beta == 0.5
    assert build_distillation(load_recipe('digits'), [torch.nn.Linear(64, 10)]).on_policy is None


def test_bad_values_and_a_student_that_cannot_generate_are_named():
    assert problems() == []
    found = problems('distillation.on_policy.fraction=1.5', 'distillation.on_policy.source=dataset')
    assert any(r'fraction (the share of batches trained on generated sequences) must lie in [0, 1]' in p for p in found)
    assert any('needs a student that generates text' in p and "student.kind 'mlp'" in p for p in found)
    assert problems('distillation.on_policy.source=dataset')[0].startswith(
        "distillation.on_policy: OnPolicy source must be 'student'"
    )


def test_a_misspelled_key_gets_the_nearest():
    with pytest.raises(
        RecipeError,
        match="distillation.on_policy.fractoin: unknown key; did you mean 'distillation.on_policy.fraction'",
    ):
        load_recipe('digits', ['distillation.on_policy.fractoin=0.5'])


def test_the_divergences_take_their_mixing_weight_from_loss_options():
    recipe = load_recipe('digits', ['distillation.loss=gjsd', 'distillation.loss_options={beta: 0.9}'])
    assert check_recipe(recipe) == []
    assert build_distillation(recipe, [torch.nn.Linear(64, 10)]).kd_loss_fn.beta == 0.9
    bad = load_recipe('digits', ['distillation.loss=skew_reverse_kl', 'distillation.loss_options={alpha: 1.0}'])
    assert any(r'alpha must be a number in [0, 1)' in p for p in check_recipe(bad))
