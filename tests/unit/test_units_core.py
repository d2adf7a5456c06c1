"""Direct tests of the objects ``Distillation`` dispatches to, without a Trainer: the shared teacher-logits function,
the NaN/+inf guard, feature distillation and the teacher cache's per-fit state. Each is checked against the
computation written out; the Trainer-level tests check that ``Distillation`` wires them as before."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from composer.core import Event, Precision, Time
from composer.devices import DeviceCPU
from composer.loggers import Logger, LoggerDestination
from composer.models import ComposerClassifier
from torch import nn

from composer_kd.cache import CachedFit, IndexedDataset, TeacherCache, attach_index
from composer_kd.models.teachers import TeacherInference, TeacherRunner, resolve_teacher_logits_key, teacher_logits
from composer_kd.parts.features import FeatureDistillation, FeaturePair
from composer_kd.parts.guard import NonFiniteGuard


def linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


# ---- teacher_logits -------------------------------------------------------------------------------------------


def test_teacher_logits_average_each_teachers_output_on_the_batch_inputs():
    teachers = [linear(4, 3, seed=1), linear(4, 3, seed=2), linear(4, 3, seed=3)]
    inputs = torch.randn(5, 4)
    logits = teacher_logits(teachers, (inputs, torch.zeros(5, dtype=torch.long)))
    expected = torch.stack([t(inputs) for t in teachers]).mean(0)
    torch.testing.assert_close(logits, expected)
    assert not logits.requires_grad


def test_teacher_logits_put_a_teacher_found_training_back_in_eval_mode():
    teacher = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9))
    teacher.train()
    inputs = torch.randn(6, 4)
    first = teacher_logits([teacher], inputs)
    assert not teacher.training
    torch.testing.assert_close(first, teacher_logits([teacher], inputs))  # dropout is off: deterministic


class TwoOutputs(nn.Module):
    def forward(self, x):
        return {'digit': x[:, :3], 'parity': x[:, 3:]}


def test_logits_key_rule_bare_tensors_and_explicit_keys():
    inputs = torch.randn(2, 5)
    # Without a teacher key, the student's key reads dict outputs and a bare tensor is the logits.
    key, bare = resolve_teacher_logits_key('digit', None)
    torch.testing.assert_close(
        teacher_logits([TwoOutputs()], inputs, logits_key=key, bare_tensor_is_logits=bare), inputs[:, :3]
    )
    torch.testing.assert_close(
        teacher_logits([nn.Identity()], inputs, logits_key=key, bare_tensor_is_logits=bare), inputs
    )
    # An explicit teacher key applies to bare tensors too (here a callable slicing them).
    key, bare = resolve_teacher_logits_key('digit', lambda out: out[:, 1:])
    torch.testing.assert_close(
        teacher_logits([nn.Identity()], inputs, logits_key=key, bare_tensor_is_logits=bare), inputs[:, 1:]
    )


def test_teacher_logits_run_a_runner_on_inputs_adapted_to_its_options():
    teacher = linear(4, 3, seed=4).eval().requires_grad_(False)
    runner = TeacherRunner(teacher, TeacherInference(dtype=torch.bfloat16))
    runner.prepare()
    inputs = torch.randn(3, 4)
    logits = teacher_logits([runner], inputs, precision=Precision.FP32)
    assert logits.dtype == torch.bfloat16
    expected = F.linear(inputs.bfloat16(), teacher.weight.bfloat16(), teacher.bias.bfloat16())
    torch.testing.assert_close(logits, expected)
    assert teacher.weight.dtype == torch.float32  # the user's teacher is not converted
    runner.release()


# ---- NonFiniteGuard -------------------------------------------------------------------------------------------


def fake_state(batch: int = 3, epoch: int = 0):
    return SimpleNamespace(timestamp=SimpleNamespace(batch=batch, epoch=epoch))


def test_guard_zeroes_unusable_logits_without_touching_the_teachers_tensor():
    guard = NonFiniteGuard('raise')
    poisoned = torch.tensor([[1.0, float('nan')], [2.0, 3.0]])
    screened, usable = guard.screen(poisoned)
    assert not bool(usable) and torch.equal(screened, torch.zeros(2, 2))
    assert poisoned[0, 1].isnan()  # a new tensor: the teacher's output is left as it was
    clean, usable = guard.screen(torch.tensor([[1.0, -float('inf')]]))
    assert bool(usable) and clean[0, 0] == 1.0 and clean[0, 1] == -float('inf')  # -inf is an impossible class
    assert guard.mask(torch.tensor(2.0), torch.tensor(False)) == 0.0 and guard.mask(torch.tensor(2.0), None) == 2.0


def test_guard_raises_naming_the_batch_before_the_optimizer_step():
    guard = NonFiniteGuard('raise')
    assert guard.check_event is Event.AFTER_TRAIN_BATCH
    guard.screen(torch.tensor([float('inf')]))
    with pytest.raises(FloatingPointError, match=r'batch 3 \(epoch 0\)'):
        guard.settle(fake_state(), Logger(state=None, destinations=[]))
    assert not guard.pending


class MetricsRecorder(LoggerDestination):
    def __init__(self):
        self.logged: list[dict[str, float]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append(dict(metrics))


def test_guard_skip_counts_poisoned_microbatches_and_logs_the_running_total():
    recorder = MetricsRecorder()
    logger = Logger(state=SimpleNamespace(timestamp=SimpleNamespace(batch=Time(3, 'ba'))), destinations=[recorder])
    guard = NonFiniteGuard('skip', log_key='distillation/x/skipped_microbatches')
    assert guard.check_event is Event.BATCH_END
    for logits in (torch.tensor([float('nan')]), torch.tensor([1.0]), torch.tensor([float('inf')])):
        guard.screen(logits)
    guard.settle(fake_state(), logger)
    assert guard.skipped == 2 and not guard.pending
    guard.screen(torch.tensor([1.0]))
    guard.settle(fake_state(), logger)  # nothing poisoned: no count, no log
    guard.screen(torch.tensor([float('nan')]))
    guard.settle(fake_state(), logger)
    assert recorder.logged == [{'distillation/x/skipped_microbatches': 2}, {'distillation/x/skipped_microbatches': 3}]


def test_guard_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="on_nonfinite_teacher must be 'raise' or 'skip'"):
        NonFiniteGuard('ignore')


# ---- FeatureDistillation --------------------------------------------------------------------------------------


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(hidden=nn.Linear(6, width), act=nn.ReLU(), out=nn.Linear(width, 4)))


def test_feature_distillation_lends_a_projection_and_gives_the_mse_of_projected_features():
    student, teacher = ComposerClassifier(mlp(8, seed=1), num_classes=4), mlp(16, seed=2)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    state = SimpleNamespace(model=student, device=DeviceCPU(), optimizers=optimizer, fsdp_config=None)
    features = FeatureDistillation([{'student': 'hidden', 'teacher': 'hidden', 'weight': 0.5}], n_teachers=1)
    features.init(state, [teacher])
    projection = features.projections['0']
    assert projection.weight.shape == (16, 8)
    assert student.distillation_projections is features.projections  # lent to the student during the fit
    assert optimizer.param_groups[-1]['params'] == [projection.weight]
    # DDP must leave the projection (used after the forward pass) to reduce_gradients().
    assert student._ddp_params_and_buffers_to_ignore == ['distillation_projections.0.weight']
    assert not features.reduces_gradients  # one process: nothing to average
    features.start([teacher])
    features.capture(True)
    inputs = torch.randn(5, 6)
    student.module(inputs), teacher(inputs)
    terms = features.losses(inputs, active_teachers=[0])
    loss, weight = terms['feature_0']
    expected = (projection(student.module.hidden(inputs)) - teacher.hidden(inputs)).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    assert weight == 0.5
    # Zeroed where the teachers' logits were unusable; nothing for pairs whose teacher did not run.
    student.module(inputs), teacher(inputs)
    assert features.losses(inputs, [0], usable=torch.tensor(False))['feature_0'][0] == 0.0
    assert features.losses(inputs, active_teachers=[]) == {}
    features.end()
    assert not hasattr(student, 'distillation_projections')  # the student is the model it was
    assert not student.module.hidden._forward_hooks and not teacher.hidden._forward_hooks


def test_feature_distillation_checks_pairs_when_made():
    with pytest.raises(ValueError, match=r'feature_pairs\[0\].teacher_index=1 but there are 1 teachers'):
        FeatureDistillation([FeaturePair('hidden', 'hidden', teacher_index=1)], n_teachers=1)
    with pytest.raises(TypeError, match=r'feature_pairs\[0\] must be a FeaturePair or a dict'):
        FeatureDistillation(['hidden'], n_teachers=1)
    assert FeatureDistillation([], n_teachers=1, name='digit').projections_name == 'distillation_projections_digit'


# ---- CachedFit ------------------------------------------------------------------------------------------------


def test_cached_fit_takes_indices_off_the_batch_and_hands_them_out_per_microbatch():
    cache = TeacherCache()
    cache.bind({'teacher': 'x'}, n_rows=10)
    fit = CachedFit(cache, dataset_key='index')
    samples = [attach_index((torch.full((2,), float(i)), torch.tensor(i % 3)), i) for i in (7, 2, 5, 9)]
    batch = torch.utils.data.default_collate(samples)
    state = SimpleNamespace(batch=batch)
    fit.on_event(Event.AFTER_DATALOADER, state)
    assert isinstance(state.batch, (list, tuple)) and len(state.batch) == 2  # the index is gone
    fit.on_event(Event.BEFORE_TRAIN_BATCH, state)
    logits, rows = fit.lookup(state, 2, 'cpu')
    assert logits is None and rows.tolist() == [7, 2]
    fit.record(rows, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert fit.microbatch_rows(state, 2).tolist() == [5, 9]
    fit.on_event(Event.AFTER_TRAIN_BATCH, state)  # every index used: fine
    fit.on_event(Event.BEFORE_TRAIN_BATCH, state)  # microbatches rerun (e.g. after an OOM) from the first
    logits, rows = fit.lookup(state, 2, 'cpu')
    torch.testing.assert_close(logits, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match='used 2 of the batch'):
        fit.on_event(Event.AFTER_TRAIN_BATCH, state)


def test_cached_fit_reads_indices_from_index_key():
    cache = TeacherCache(index_key='id')
    cache.bind({'teacher': 'x'}, n_rows=4)
    fit = CachedFit(cache, dataset_key=None)
    state = SimpleNamespace(batch={'x': torch.zeros(2, 3), 'id': torch.tensor([3, 1])})
    assert fit.microbatch_rows(state, 2).tolist() == [3, 1]
    with pytest.raises(ValueError, match="index_key='id' holds 2 indices for a microbatch whose logits have 3 rows"):
        fit.microbatch_rows(state, 3)


def test_indexed_dataset_is_what_cached_fit_reads():
    data = IndexedDataset(torch.utils.data.TensorDataset(torch.zeros(3, 2)))
    assert data.key == 'index'
