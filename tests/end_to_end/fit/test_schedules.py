"""Schedules of the temperature and loss weights over training (progressive distillation)."""

from __future__ import annotations

import math

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from conftest import AfterLossRecorder, make_dataloader, make_student, make_teacher
from torch import nn

from composer_kd import ConstantSchedule, CosineSchedule, Distillation, KLDivergence, LinearSchedule, LogitsMSE


def run(algorithm, teacher, n_batches=10, max_duration=None):
    log, metrics = AfterLossRecorder(), InMemoryLogger()
    Trainer(
        model=make_student(),
        train_dataloader=make_dataloader(n=8 * n_batches),
        max_duration=max_duration or '1ep',
        algorithms=[algorithm],
        callbacks=[log],
        loggers=[metrics],
        device='cpu',
        progress_bar=False,
    ).fit()
    return log.steps, metrics.data


def test_linear_kd_weight_and_temperature_follow_their_formulas():
    teacher = make_teacher()
    algorithm = Distillation(
        teacher,
        KLDivergence(),
        org_loss_weight=0.5,
        kd_loss_weight=LinearSchedule(1.0, 0.0, end='0.5dur'),
        temperature=LinearSchedule(8.0, 2.0, start='2ba', end='8ba'),
    )
    steps, metrics = run(algorithm, teacher)
    teacher.eval()
    logged_w = [v for _, v in metrics['distillation/kd_loss_weight']]
    logged_t = [v for _, v in metrics['distillation/temperature']]
    for step, w, t in zip(steps, logged_w, logged_t, strict=True):
        b = step['batch_index']
        expected_w = 1.0 - min(b / 5, 1.0)
        expected_t = 8.0 + (2.0 - 8.0) * min(max((b - 2) / 6, 0.0), 1.0)
        assert w == pytest.approx(expected_w) and t == pytest.approx(expected_t)
        p = torch.softmax(teacher(step['inputs']).double() / expected_t, -1)
        q = torch.softmax(step['logits'].double() / expected_t, -1)
        kd = expected_t**2 * (p * (p.log() - q.log())).sum(-1).mean()
        loss = step['loss']
        # At T = 8 the distributions are nearly flat and float32 keeps ~5 significant digits of their KL.
        assert loss['kd'].item() == pytest.approx(kd.item(), rel=1e-4)
        assert loss['total'].item() == pytest.approx(0.5 * loss['original'].item() + expected_w * kd.item(), rel=1e-4)
    assert len(steps) == 10


def test_cosine_schedule_in_epochs():
    teacher = make_teacher()
    algorithm = Distillation(teacher, org_loss_weight=CosineSchedule(0.0, 1.0, start='1ep', end='3ep'))
    steps, metrics = run(algorithm, teacher, n_batches=2, max_duration='4ep')
    logged = [v for _, v in metrics['distillation/org_loss_weight']]
    expected = [(1 - math.cos(math.pi * min(max((b - 2) / 4, 0), 1))) / 2 for b in range(8)]
    assert logged == pytest.approx(expected)


def test_constant_schedule_and_plain_numbers_agree():
    teacher = make_teacher()
    steps_a, _ = run(Distillation(teacher, kd_loss_weight=ConstantSchedule(0.3)), teacher, n_batches=3)
    steps_b, _ = run(Distillation(teacher, kd_loss_weight=0.3), teacher, n_batches=3)
    for a, b in zip(steps_a, steps_b, strict=True):
        assert a['loss']['total'].item() == pytest.approx(b['loss']['total'].item(), rel=1e-6)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'kd_loss_weight': LinearSchedule(1.0, -0.5)}, 'kd_loss_weight must be a number >= 0'),
        ({'temperature': LinearSchedule(4.0, 0.0)}, 'temperature must be a number > 0'),
        ({'temperature': -1.0}, 'temperature must be a number > 0'),
        ({'org_loss_weight': ConstantSchedule(0.0), 'kd_loss_weight': 0.0}, 'both 0'),
        ({'kd_loss_fn': LogitsMSE(), 'temperature': 2.0}, 'LogitsMSE has no `temperature`'),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Distillation(make_teacher(), **kwargs)


def test_schedule_with_incomparable_units_names_itself():
    teacher = make_teacher()
    algorithm = Distillation(teacher, kd_loss_weight=LinearSchedule(1.0, 0.0, start='0ba', end='64sp'))
    with pytest.raises(ValueError, match=r'LinearSchedule\(1.0, 0.0.*different units'):
        run(algorithm, teacher, n_batches=2)


def test_schedule_needs_no_checkpoint_state():
    schedule = LinearSchedule(2.0, 1.0)
    assert not isinstance(schedule, nn.Module)
    assert repr(schedule) == 'LinearSchedule(2.0, 1.0, start=0.0dur, end=1.0dur)'


def test_fractions_of_training_are_not_rounded_to_whole_batches():
    """'0.5dur' of 5 batches is batch 2.5: the schedule as written, and a window covering batches 0 to 2."""
    teacher = make_teacher()
    scheduled = Distillation(teacher, kd_loss_weight=LinearSchedule(1.0, 0.0, end='0.5dur'))
    _, metrics = run(scheduled, teacher, n_batches=5)
    logged = [v for _, v in metrics['distillation/kd_loss_weight']]
    assert logged == pytest.approx([1.0, 0.6, 0.2, 0.0, 0.0])
    windowed = Distillation(teacher, start='0.3dur', end='0.5dur')
    steps, _ = run(windowed, teacher, n_batches=5)
    # Batch i begins when i/5 of training is done: inside [0.3, 0.5) for i = 2 only (0.4); 1.5 <= i < 2.5.
    assert [step['batch_index'] for step in steps if isinstance(step['loss'], dict)] == [2]
