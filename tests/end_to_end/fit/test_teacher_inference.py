"""Opt-in teacher speed-ups: bf16 weights, channels-last, torch.compile; the user's teacher comes back intact."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from conftest import small_cnn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, FeaturePair, KLDivergence, TeacherInference
from composer_kd.models.speed import measure_teacher_inference


def images() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 5, (16,), generator=generator))
    return DataLoader(data, batch_size=8)


class KDLog(Callback):
    def __init__(self):
        self.kd = []

    def after_loss(self, state, logger):
        self.kd.append(state.loss['kd'].item())


def run(teacher: nn.Module, inference: TeacherInference | None, **kwargs) -> list[float]:
    log = KDLog()
    Trainer(
        model=ComposerClassifier(small_cnn(5, seed=1), num_classes=5),
        train_dataloader=images(),
        max_duration='1ep',
        algorithms=[Distillation(teacher, KLDivergence(2.0), teacher_inference=inference, **kwargs)],
        callbacks=[log],
        device='cpu',
        progress_bar=False,
        seed=0,
    ).fit()
    return log.kd


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_bf16_teacher_weights_stay_close_and_leave_the_users_teacher_in_fp32():
    reference = run(small_cnn(5, seed=2), None)
    teacher = small_cnn(5, seed=2)
    before = snapshot(teacher)
    kd = run(teacher, TeacherInference(dtype=torch.bfloat16))
    assert kd == pytest.approx(reference, rel=0.05)  # bf16 keeps ~3 significant digits of the logits
    assert kd != reference  # and the bf16 copy really ran
    for key, value in teacher.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key


def test_channels_last_gives_the_same_losses_and_restores_the_layout():
    reference = run(small_cnn(5, seed=2), None)
    teacher = small_cnn(5, seed=2)
    layouts = []

    class LayoutProbe(Callback):
        def after_loss(self, state, logger):
            layouts.append(teacher[0].weight.is_contiguous(memory_format=torch.channels_last))

    log = KDLog()
    Trainer(
        model=ComposerClassifier(small_cnn(5, seed=1), num_classes=5),
        train_dataloader=images(),
        max_duration='1ep',
        algorithms=[Distillation(teacher, KLDivergence(2.0), teacher_inference=TeacherInference(channels_last=True))],
        callbacks=[log, LayoutProbe()],
        device='cpu',
        progress_bar=False,
        seed=0,
    ).fit()
    assert log.kd == pytest.approx(reference, rel=1e-4)
    assert layouts == [True, True]
    assert teacher[0].weight.is_contiguous()  # the user's layout is back


def test_compiled_teacher_runs_and_is_uncompiled_afterwards():
    teacher = small_cnn(5, seed=2)
    kd = run(teacher, TeacherInference(compile={'backend': 'eager'}))
    assert kd == pytest.approx(run(small_cnn(5, seed=2), None), rel=1e-5)
    assert teacher._compiled_call_impl is None


def test_bf16_copy_is_what_feature_hooks_watch():
    teacher = small_cnn(5, seed=2)
    kd = run(
        teacher,
        TeacherInference(dtype=torch.bfloat16),
        feature_pairs=[FeaturePair(student='0', teacher='0', loss='mse')],
    )
    assert len(kd) == 2
    assert not teacher[0]._forward_hooks


def test_compile_with_feature_pairs_is_refused():
    with pytest.raises(ValueError, match='compile cannot be combined with feature_pairs'):
        Distillation(
            small_cnn(5, seed=2),
            teacher_inference=TeacherInference(compile=True),
            feature_pairs=[FeaturePair('0', '0')],
        )


def test_measuring_the_options_leaves_the_teacher_alone_and_reports_each():
    teacher = small_cnn(5, seed=0).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = next(iter(images()))
    options = {'bf16': TeacherInference(dtype=torch.bfloat16), 'channels_last': TeacherInference(channels_last=True)}
    results = measure_teacher_inference(teacher, batch, options, repeats=4, rounds=2)
    assert list(results) == ['plain', 'bf16', 'channels_last']
    for row in results.values():
        assert row['milliseconds'] > 0
        assert row['speedup'] == pytest.approx(results['plain']['milliseconds'] / row['milliseconds'])
    assert results['plain']['max_abs_difference'] == 0.0
    assert results['channels_last']['max_abs_difference'] < 1e-5  # the same math in another layout
    assert 0.0 < results['bf16']['max_abs_difference'] < 0.1  # bf16 rounds, a little
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert teacher[0].weight.is_contiguous()  # not left channels-last


def testdefault_candidates_offer_channels_last_only_to_convolutional_teachers():
    from composer_kd.models.speed import default_candidates

    assert set(default_candidates(small_cnn(5, seed=0))) == {'bf16', 'channels_last', 'compile'}
    assert set(default_candidates(nn.Linear(4, 2))) == {'bf16', 'compile'}
