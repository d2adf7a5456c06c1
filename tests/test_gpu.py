"""CUDA-only behaviour: teachers moved to the trainer's device, and run under its precision context."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from conftest import make_dataloader, make_student, make_teacher

from composer_kd import Distillation, KLDivergence

pytestmark = pytest.mark.gpu


class TeacherProbe(Callback):
    def __init__(self, teacher):
        self.teacher = teacher
        self.devices, self.dtypes, self.kd = [], [], []
        teacher.register_forward_hook(lambda m, a, out: self.dtypes.append(out.dtype))

    def after_loss(self, state, logger):
        self.devices.append(next(self.teacher.parameters()).device.type)
        self.kd.append(state.loss['kd'].detach())


@pytest.mark.parametrize('precision', ['fp32', 'amp_bf16'])
def test_teacher_on_cuda_under_trainer_precision(precision):
    teacher = make_teacher()
    probe = TeacherProbe(teacher)
    Trainer(
        model=make_student(),
        train_dataloader=make_dataloader(),
        max_duration='1ep',
        device='gpu',
        precision=precision,
        algorithms=[Distillation(teacher, KLDivergence(2.0))],
        callbacks=[probe],
        progress_bar=False,
    ).fit()
    assert probe.devices == ['cuda'] * 4
    expected = torch.bfloat16 if precision == 'amp_bf16' else torch.float32
    assert probe.dtypes == [expected] * 4
    assert all(torch.isfinite(kd) and kd.dtype == torch.float32 for kd in probe.kd)
    # Moved once, and left on the device (parameters are bit-identical, only placed).
    assert next(teacher.parameters()).device.type == 'cuda'
