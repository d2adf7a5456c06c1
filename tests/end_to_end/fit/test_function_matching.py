"""Consistent teaching: ``Distillation`` beside Composer's ``MixUp``/``CutMix`` and a dataset's random augmentation.

The teacher must answer on exactly the input the student was given (mixed and augmented), whatever the order of
the algorithms; the distillation term is the loss on that input; ``interpolate_loss=True`` is refused at
``Trainer()``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from composer import Callback, Event, State, Trainer
from composer.algorithms import CutMix, MixUp
from composer.loggers import Logger
from composer.models import ComposerClassifier
from conftest import N_CLASSES, AfterLossRecorder, fit
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from composer_kd import DecoupledKD, Distillation, KLDivergence

pytestmark = pytest.mark.usefixtures('one_thread')

SHAPE = (1, 4, 4)  # image-shaped, for CutMix's boxes
N, BATCH = 32, 8


class Images(Dataset):
    """``N`` random images and labels, each image through ``transform`` (random) when one is given."""

    def __init__(self, transform: Any = None):
        generator = torch.Generator().manual_seed(3)
        self.x = torch.randn(N, *SHAPE, generator=generator)
        self.y = torch.randint(0, N_CLASSES, (N,), generator=generator)
        self.transform = transform

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x[i] if self.transform is None else self.transform(self.x[i])), self.y[i]


def shift() -> Any:
    """A random shift of up to one pixel: torchvision's ``RandomCrop`` on tensors, padded with zeros."""
    return transforms.RandomCrop(SHAPE[1:], padding=1)


def teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def student() -> ComposerClassifier:
    torch.manual_seed(1)
    return ComposerClassifier(nn.Sequential(nn.Flatten(), nn.Linear(16, N_CLASSES)), num_classes=N_CLASSES)


def record_inputs(module: nn.Module) -> list[torch.Tensor]:
    """Every input ``module`` is called with, from now on (a forward hook)."""
    seen: list[torch.Tensor] = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    return seen


class Mixing(Callback):
    """Per batch: the batch as the dataloader gave it, and MixUp's mixing coefficient and partner indices."""

    def __init__(self, mixing: Any):
        self.mixing, self.loaded, self.coefficients, self.indices = mixing, [], [], []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_DATALOADER:
            self.loaded.append([t.clone() for t in state.batch])
        elif event == Event.AFTER_LOSS and isinstance(self.mixing, MixUp):  # after the algorithms of the event
            self.coefficients.append(float(self.mixing.mixing))
            self.indices.append(self.mixing.indices.clone())


ORDERS = pytest.mark.parametrize('mixing_first', [True, False], ids=['mixing_first', 'distillation_first'])


@ORDERS
@pytest.mark.parametrize('make_mixing', [MixUp, CutMix], ids=['MixUp', 'CutMix'])
def test_teacher_sees_the_mixed_augmented_input_the_student_sees(make_mixing, mixing_first):
    t, s = teacher(), student()
    teacher_inputs, student_inputs = record_inputs(t), record_inputs(s.module)
    mixing = make_mixing(alpha=1.0)
    distillation = Distillation(t, KLDivergence(temperature=2.0), org_loss_weight=0.5, kd_loss_weight=1.0)
    mixing_log = Mixing(mixing)
    dataloader = DataLoader(Images(shift()), batch_size=BATCH)
    fit(s, [mixing, distillation] if mixing_first else [distillation, mixing], dataloader, callbacks=[mixing_log])
    assert len(teacher_inputs) == len(student_inputs) == N // BATCH
    for seen_by_teacher, seen_by_student in zip(teacher_inputs, student_inputs, strict=True):
        assert torch.equal(seen_by_teacher, seen_by_student)
    # ... and that input is the mixed one: it differs from what the dataloader gave on some batch.
    loaded = [batch[0] for batch in mixing_log.loaded]
    assert any(not torch.equal(x, mixed) for x, mixed in zip(loaded, student_inputs, strict=True))


def test_teacher_sees_the_datasets_random_augmentation():
    t, s = teacher(), student()
    teacher_inputs, student_inputs = record_inputs(t), record_inputs(s.module)
    dataset = Images(shift())
    fit(s, [Distillation(t, KLDivergence(temperature=2.0))], DataLoader(dataset, batch_size=BATCH))
    assert len(teacher_inputs) == len(student_inputs) == N // BATCH
    for seen_by_teacher, seen_by_student in zip(teacher_inputs, student_inputs, strict=True):
        assert torch.equal(seen_by_teacher, seen_by_student)
    raw = dataset.x.split(BATCH)
    assert any(not torch.equal(x, seen) for x, seen in zip(raw, student_inputs, strict=True))  # shifted


@ORDERS
@pytest.mark.parametrize('org_loss_weight', [0.0, 0.5])
def test_loss_terms_under_mixup_follow_their_formulas_on_the_mixed_input(org_loss_weight, mixing_first):
    t, s = teacher(), student()
    kd_loss_fn = KLDivergence(temperature=2.0)
    mixup = MixUp(alpha=1.0)
    distillation = Distillation(t, kd_loss_fn, org_loss_weight=org_loss_weight, kd_loss_weight=1.0)
    recorder, mixing_log = AfterLossRecorder(), Mixing(mixup)
    algorithms = [mixup, distillation] if mixing_first else [distillation, mixup]
    fit(s, algorithms, DataLoader(Images(), batch_size=BATCH), callbacks=[recorder, mixing_log])
    assert len(recorder.steps) == N // BATCH
    for step, (x, y), mix, idx in zip(
        recorder.steps, mixing_log.loaded, mixing_log.coefficients, mixing_log.indices, strict=True
    ):
        assert 0.0 < mix <= 0.5  # MixUp keeps the batch's own image the larger share
        torch.testing.assert_close(step['inputs'], (1 - mix) * x + mix * x[idx])
        one_hot = nn.functional.one_hot(y, N_CLASSES).float()
        targets = (1 - mix) * one_hot + mix * one_hot[idx]
        torch.testing.assert_close(step['targets'], targets)  # the label term's targets are the mixed ones
        logits = step['logits']
        with torch.no_grad():
            kd = kd_loss_fn(logits, t(step['inputs']))  # the teacher on the mixed input
        original = -(targets * logits.log_softmax(-1)).sum(-1).mean()
        loss = step['loss']
        torch.testing.assert_close(loss['kd'], kd)
        torch.testing.assert_close(loss['original'], original)
        torch.testing.assert_close(loss['total'], org_loss_weight * original + kd)


@pytest.mark.parametrize('make_mixing', [MixUp, CutMix], ids=['MixUp', 'CutMix'])
def test_interpolate_loss_is_refused_when_the_trainer_is_built(make_mixing):
    distillation = Distillation(teacher(), KLDivergence(temperature=2.0))
    with pytest.raises(ValueError, match=rf'{make_mixing.__name__}\(interpolate_loss=True\).*interpolate_loss=False'):
        Trainer(
            model=student(),
            train_dataloader=DataLoader(Images(), batch_size=BATCH),
            max_duration='1ep',
            algorithms=[make_mixing(alpha=1.0, interpolate_loss=True), distillation],
            progress_bar=False,
            device='cpu',
        )


def test_a_loss_needing_hard_labels_names_what_mixup_took():
    # MixUp's default replaces the integer labels by mixed soft targets before the loss: DecoupledKD has none.
    distillation = Distillation(teacher(), DecoupledKD(temperature=2.0))
    with pytest.raises(ValueError, match='DecoupledKD needs the target class'):
        fit(student(), [MixUp(alpha=1.0), distillation], DataLoader(Images(), batch_size=BATCH), max_duration='1ba')
