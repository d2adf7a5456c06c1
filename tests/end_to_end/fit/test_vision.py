"""A torchvision pair: a ResNet teacher loaded from a Composer checkpoint, a small CNN student."""

from __future__ import annotations

import pytest
import torch
import torchvision
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from conftest import small_cnn
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, KLDivergence

N_CLASSES = 5


def images(n: int = 16, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=generator)
    y = torch.randint(0, N_CLASSES, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.fixture(scope='module')
def resnet_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    trained = ComposerClassifier(torchvision.models.resnet18(num_classes=N_CLASSES), num_classes=N_CLASSES)
    folder = tmp_path_factory.mktemp('resnet')
    Trainer(
        model=trained,
        train_dataloader=images(seed=1),
        max_duration='1ba',
        save_folder=str(folder),
        save_filename='resnet.pt',
        device='cpu',
        progress_bar=False,
    ).fit()
    return str(folder / 'resnet.pt'), trained.module


def test_resnet_teacher_from_composer_checkpoint_teaches_a_cnn(resnet_checkpoint):
    path, trained = resnet_checkpoint
    teacher = torchvision.models.resnet18(num_classes=N_CLASSES)
    algorithm = Distillation({path: teacher}, KLDivergence(temperature=2.0), org_loss_weight=0.3, kd_loss_weight=0.7)
    # BatchNorm running statistics included: all came from the checkpoint.
    for key, value in trained.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    kd_terms = []

    class Capture(Callback):
        def after_loss(self, state, logger):
            x, _ = state.batch
            kd_terms.append((x.clone(), state.outputs.detach().clone(), state.loss['kd'].detach().clone()))

    torch.manual_seed(1)
    student = ComposerClassifier(small_cnn(N_CLASSES), num_classes=N_CLASSES)
    Trainer(
        model=student,
        train_dataloader=images(),
        max_duration='1ep',
        algorithms=[algorithm],
        callbacks=[Capture()],
        device='cpu',
        progress_bar=False,
    ).fit()
    # Eval mode held for the whole fit: in train mode BatchNorm would have moved its running statistics.
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    teacher.eval()
    for x, student_logits, kd in kd_terms:
        p = torch.softmax(teacher(x).double() / 2.0, -1)
        q = torch.softmax(student_logits.double() / 2.0, -1)
        assert kd.item() == pytest.approx((4.0 * (p * (p.log() - q.log())).sum(-1).mean()).item(), rel=1e-5)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 100
