"""Student checkpoints written during distillation: no teacher inside, no larger, and they resume distillation."""

from __future__ import annotations

import os

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from conftest import make_dataloader, make_student, make_teacher
from torch import nn

from composer_kd import Distillation


def big_teacher() -> nn.Module:
    # Large next to the student (~70k parameters against 28), so any leak would show in the file size.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def train(folder, algorithms, max_duration='1ep', load_path=None, loggers=()) -> Trainer:
    trainer = Trainer(
        model=make_student(),
        train_dataloader=make_dataloader(),
        max_duration=max_duration,
        algorithms=algorithms,
        save_folder=str(folder),
        save_filename='ep{epoch}.pt',
        save_interval='1ep',
        load_path=load_path,
        loggers=list(loggers),
        progress_bar=False,
        device='cpu',
        seed=5,
        deterministic_mode=True,
    )
    trainer.fit()
    trainer.close()
    return trainer


def test_checkpoint_holds_no_teacher_and_is_no_larger(tmp_path):
    train(tmp_path / 'plain', [])
    train(tmp_path / 'kd', [Distillation(big_teacher())])
    plain_path, kd_path = tmp_path / 'plain' / 'ep1.pt', tmp_path / 'kd' / 'ep1.pt'
    plain = torch.load(plain_path, weights_only=False)
    kd = torch.load(kd_path, weights_only=False)
    assert kd['state']['model'].keys() == plain['state']['model'].keys()
    assert sum(t.numel() for t in tensors_in(kd)) == sum(t.numel() for t in tensors_in(plain))
    # The only addition is the algorithm's short description (a few hundred bytes); the teacher alone would
    # add ~280 kB.
    assert os.path.getsize(kd_path) - os.path.getsize(plain_path) < 1024
    (name, algorithm_state), *_ = kd['state']['algorithms']
    assert name == 'Distillation' and set(algorithm_state) == {'repr'}


def test_resume_continues_distillation_and_matches_an_uninterrupted_run(tmp_path):
    full = train(tmp_path / 'full', [Distillation(make_teacher())], max_duration='2ep')
    train(tmp_path / 'first', [Distillation(make_teacher())], max_duration='1ep')

    teacher = make_teacher()
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    logger = InMemoryLogger()
    resumed = train(
        tmp_path / 'second',
        [Distillation(teacher)],
        max_duration='2ep',
        load_path=str(tmp_path / 'first' / 'ep1.pt'),
        loggers=[logger],
    )
    assert len(calls) == 4  # only the second epoch's batches ran, each with the teacher
    assert len(logger.data['loss/train/kd']) == 4
    for name, value in full.state.model.state_dict().items():
        torch.testing.assert_close(resumed.state.model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize('sampled', [1, 2])
def test_resume_with_teacher_sampling_draws_as_uninterrupted(tmp_path, sampled):
    def teachers():
        return [make_teacher(seed=s) for s in (1, 2, 3)]

    full = train(tmp_path / 'full', [Distillation(teachers(), n_teachers_to_sample=sampled)], max_duration='2ep')
    train(tmp_path / 'first', [Distillation(teachers(), n_teachers_to_sample=sampled)], max_duration='1ep')
    resumed = train(
        tmp_path / 'second',
        [Distillation(teachers(), n_teachers_to_sample=sampled)],
        max_duration='2ep',
        load_path=str(tmp_path / 'first' / 'ep1.pt'),
    )
    for name, value in full.state.model.state_dict().items():
        torch.testing.assert_close(resumed.state.model.state_dict()[name], value, rtol=0, atol=0)
