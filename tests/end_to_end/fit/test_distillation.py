"""The Distillation algorithm inside real Composer fits: loss, gradients, freezing, timing, window, sampling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from composer import Algorithm, Callback, Event
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from conftest import N_CLASSES, N_FEATURES, AfterLossRecorder, fit, make_dataloader, make_student, make_teacher
from torch import nn

from composer_kd import Distillation, KLDivergence, combine_losses, distillation_loss, sample_teachers


def reference_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_rows sum_c p_c (log p_c - log q_c), written out in float64."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    return temperature**2 * (p * (p.log() - q.log())).sum(-1).mean()


class ForwardLog:
    """Forward hook recording each call's input and output on a module."""

    def __init__(self, module: nn.Module):
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.inputs.append(args[0].detach().clone())
        self.outputs.append(output)

    def __len__(self) -> int:
        return len(self.inputs)


def test_loss_equals_formula_at_every_step():
    teacher, student = make_teacher(), make_student()
    recorder = AfterLossRecorder()
    fit(student, [Distillation(teacher, KLDivergence(temperature=3.0), 0.25, 0.75)], callbacks=[recorder])
    assert len(recorder.steps) == 4
    for step in recorder.steps:
        teacher_logits = teacher(step['inputs'])
        kd = reference_kd(step['outputs'], teacher_logits, 3.0)
        ce = F.cross_entropy(step['outputs'].double(), step['targets'])
        loss = step['loss']
        assert set(loss) == {'original', 'kd', 'total'}
        assert loss['kd'].item() == pytest.approx(kd.item(), rel=1e-5)
        assert loss['original'].item() == pytest.approx(ce.item(), rel=1e-5)
        assert loss['total'].item() == pytest.approx((0.25 * ce + 0.75 * kd).item(), rel=1e-5)


def test_student_gradients_equal_the_formulas():
    teacher, student = make_teacher(), make_student()
    initial = copy.deepcopy(student.module)
    grads = {}

    class GradCatcher(Callback):
        def after_backward(self, state, logger):
            if not grads:
                grads.update({n: p.grad.clone() for n, p in state.model.module.named_parameters()})

    dataloader = make_dataloader()
    fit(
        student, [Distillation(teacher, KLDivergence(temperature=2.0), 0.4, 0.6)], dataloader, callbacks=[GradCatcher()]
    )
    x, y = next(iter(dataloader))
    logits = initial(x)
    loss = 0.4 * F.cross_entropy(logits, y) + 0.6 * reference_kd(logits, teacher(x).detach(), 2.0).float()
    loss.backward()
    for name, param in initial.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6)


def test_teacher_is_frozen_during_fit_unchanged_after_and_flags_restored():
    teacher, student = make_teacher(dropout=0.5), make_student()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []

    class FreezeProbe(Callback):
        def after_loss(self, state, logger):
            seen.append(
                (
                    any(m.training for m in teacher.modules()),
                    any(p.requires_grad for p in teacher.parameters()),
                    {id(p) for group in state.optimizers[0].param_groups for p in group['params']},
                )
            )

    fit(student, [Distillation(teacher)], callbacks=[FreezeProbe()])
    teacher_ids = {id(p) for p in teacher.parameters()}
    for training, requires_grad, optimized in seen:
        assert not training and not requires_grad
        assert not optimized & teacher_ids
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in teacher.parameters())
    # The user's module is given back as it came: train mode, trainable.
    assert all(m.training for m in teacher.modules())
    assert all(p.requires_grad for p in teacher.parameters())


def test_teacher_outputs_are_deterministic_and_keep_no_graph():
    teacher, student = make_teacher(dropout=0.5), make_student()
    log = ForwardLog(teacher)
    fit(student, [Distillation(teacher)], max_duration='2ep')
    outputs, inputs = list(log.outputs), list(log.inputs)
    assert len(outputs) == 8
    assert all(not out.requires_grad and out.grad_fn is None for out in outputs)
    teacher.eval()
    for i in range(4):  # the same batches in both epochs (no shuffling), identical to eval-mode outputs
        torch.testing.assert_close(outputs[i], outputs[i + 4], rtol=0, atol=0)
        torch.testing.assert_close(outputs[i], teacher(inputs[i]), rtol=0, atol=0)


def test_teacher_sees_each_microbatch_the_student_saw_once():
    teacher, student = make_teacher(), make_student()
    teacher_log, student_log = ForwardLog(teacher), ForwardLog(student.module)
    fit(student, [Distillation(teacher)], device_train_microbatch_size=4)
    assert len(teacher_log) == len(student_log) == 8  # 4 batches of 8, microbatches of 4
    for t_in, s_in in zip(teacher_log.inputs, student_log.inputs, strict=True):
        assert torch.equal(t_in, s_in)


def test_teacher_sees_the_batch_after_other_algorithms_changed_it():
    class DoubleInputs(Algorithm):
        """Stands for an algorithm that transforms inputs before the forward pass."""

        def match(self, event, state):
            return event == Event.BEFORE_FORWARD

        def apply(self, event, state, logger):
            x, y = state.batch
            state.batch = (x * 2, y)

    teacher, student = make_teacher(), make_student()
    teacher_log, student_log = ForwardLog(teacher), ForwardLog(student.module)
    dataloader = make_dataloader()
    fit(student, [DoubleInputs(), Distillation(teacher)], dataloader)
    x0, _ = next(iter(dataloader))
    assert torch.equal(student_log.inputs[0], x0 * 2)
    assert torch.equal(teacher_log.inputs[0], x0 * 2)


def test_teachers_never_run_in_evaluation_or_prediction():
    teacher, student = make_teacher(), make_student()
    log = ForwardLog(teacher)
    trainer = fit(student, [Distillation(teacher)], eval_dataloader=make_dataloader(seed=3), eval_interval='1ep')
    assert len(log) == 4
    trainer.eval()
    trainer.predict(make_dataloader(seed=4))
    assert len(log) == 4


def test_batch_is_not_mutated():
    dataloader = make_dataloader()
    snapshot = [(x.clone(), y.clone()) for x, y in dataloader]
    recorder = AfterLossRecorder()
    fit(make_student(), [Distillation(make_teacher())], dataloader, callbacks=[recorder])
    for (x, y), step in zip(snapshot, recorder.steps, strict=True):
        assert torch.equal(step['inputs'], x) and torch.equal(step['targets'], y)
    for (x, y), (x2, y2) in zip(snapshot, dataloader, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_several_teachers_are_averaged():
    teachers = [make_teacher(seed=s) for s in (1, 2, 3)]
    recorder = AfterLossRecorder()
    fit(make_student(), [Distillation(teachers, KLDivergence(2.0))], callbacks=[recorder])
    for step in recorder.steps:
        mean_logits = torch.stack([t(step['inputs']) for t in teachers]).mean(0)
        assert step['loss']['kd'].item() == pytest.approx(reference_kd(step['outputs'], mean_logits, 2.0).item(), 1e-5)


def run_sampled(seed: int) -> tuple[list[list[int]], AfterLossRecorder, list[nn.Module]]:
    teachers = [make_teacher(seed=s) for s in (1, 2, 3)]
    logs = [ForwardLog(t) for t in teachers]
    recorder = AfterLossRecorder()
    dataloader = make_dataloader(n=96)
    fit(make_student(), [Distillation(teachers, n_teachers_to_sample=1)], dataloader, callbacks=[recorder], seed=seed)
    # Rebuild which teacher ran at each step by matching the hooks' recorded inputs, in call order.
    per_teacher = [len(log) for log in logs]
    calls = []
    counters = [0, 0, 0]
    for step in recorder.steps:
        ran = []
        for i, log in enumerate(logs):
            if counters[i] < len(log) and torch.equal(log.inputs[counters[i]], step['inputs']):
                ran.append(i)
                counters[i] += 1
        calls.append(ran)
    assert sum(per_teacher) == len(recorder.steps) == 12
    return calls, recorder, teachers


def test_sampling_draws_k_teachers_per_step_reproducibly():
    calls, recorder, teachers = run_sampled(seed=1)
    assert all(len(ran) == 1 for ran in calls)
    again, _, _ = run_sampled(seed=1)
    assert calls == again
    other, _, _ = run_sampled(seed=2)
    assert calls != other
    assert len({ran[0] for ran in calls}) > 1
    for ran, step in zip(calls, recorder.steps, strict=True):
        expected = reference_kd(step['outputs'], teachers[ran[0]](step['inputs']), 4.0)
        assert step['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_sample_teachers_is_a_function_of_seed_and_step():
    draws = [sample_teachers(5, 2, seed=0, step=s) for s in range(20)]
    assert all(len(d) == 2 and len(set(d)) == 2 and all(0 <= i < 5 for i in d) for d in draws)
    assert draws == [sample_teachers(5, 2, seed=0, step=s) for s in range(20)]
    assert len({tuple(d) for d in draws}) > 1


@pytest.mark.parametrize(
    ('start', 'end', 'max_duration', 'active'),
    [
        ('2ba', '4ba', '1ep', [2, 3]),
        (0.5, None, '1ep', [3, 4, 5]),
        ('0.0dur', '0.5dur', '1ep', [0, 1, 2]),
        ('1ep', None, '2ep', [6, 7, 8, 9, 10, 11]),
        (0.0, '0.25dur', '12ba', [0, 1, 2]),
    ],
)
def test_window_runs_teacher_only_inside(start, end, max_duration, active):
    teacher = make_teacher()
    log = ForwardLog(teacher)
    recorder = AfterLossRecorder()
    dataloader = make_dataloader(n=48)  # 6 batches an epoch
    fit(make_student(), [Distillation(teacher, start=start, end=end)], dataloader, max_duration, [recorder])
    with_kd = [s['batch_index'] for s in recorder.steps if isinstance(s['loss'], dict)]
    assert with_kd == active
    assert len(log) == len(active)
    for step in recorder.steps:
        if step['batch_index'] not in active:  # untouched: the model's own loss tensor
            assert isinstance(step['loss'], torch.Tensor)


def test_composer_classifier_teacher_and_custom_keys():
    class DictOutputTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_teacher()

        def forward(self, features):
            return {'scores': self.net(features), 'hidden': features}

    teacher = DictOutputTeacher()
    recorder = AfterLossRecorder()
    algorithm = Distillation(teacher, input_key=lambda batch: batch[0], teacher_logits_key='scores')
    fit(make_student(), [algorithm], callbacks=[recorder])
    step = recorder.steps[0]
    expected = reference_kd(step['outputs'], teacher.net(step['inputs']), 4.0)
    assert step['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)

    composer_teacher = ComposerClassifier(make_teacher(seed=4), num_classes=N_CLASSES)
    recorder = AfterLossRecorder()
    fit(make_student(), [Distillation(composer_teacher)], callbacks=[recorder])
    step = recorder.steps[0]
    expected = reference_kd(step['outputs'], composer_teacher.module(step['inputs']), 4.0)
    assert step['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_logged_per_term():
    logger = InMemoryLogger()
    fit(make_student(), [Distillation(make_teacher(), org_loss_weight=0.5, kd_loss_weight=2.0)], loggers=[logger])
    last = {k: v[-1][1] for k, v in logger.data.items() if k.startswith('loss/train/')}
    assert set(last) == {'loss/train/original', 'loss/train/kd', 'loss/train/total'}
    assert last['loss/train/total'] == pytest.approx(0.5 * last['loss/train/original'] + 2.0 * last['loss/train/kd'])


def test_combine_losses_for_every_original_form():
    kd = torch.tensor(2.0)
    single = combine_losses(torch.tensor([1.0, 3.0]), kd, 0.5, 0.25)
    assert {k: v.item() for k, v in single.items()} == {'original': 2.0, 'kd': 2.0, 'total': 1.5}
    pair = combine_losses((torch.tensor(1.0), torch.tensor([2.0, 4.0])), kd, 1.0, 1.0)
    assert {k: v.item() for k, v in pair.items()} == {
        'original_0': 1.0,
        'original_1': 3.0,
        'original': 4.0,
        'kd': 2.0,
        'total': 6.0,
    }
    named = combine_losses({'ce': torch.tensor(1.0), 'aux': torch.tensor(0.5)}, kd, 2.0, 1.0)
    assert {k: v.item() for k, v in named.items()} == {'ce': 1.0, 'aux': 0.5, 'original': 1.5, 'kd': 2.0, 'total': 5.0}
    with_total = combine_losses({'ce': torch.tensor(1.0), 'total': torch.tensor(7.0)}, kd, 1.0, 0.5)
    assert with_total['original'].item() == 7.0 and with_total['total'].item() == 8.0


def test_model_returning_a_dict_loss_trains_with_its_terms_logged():
    class TwoTermClassifier(ComposerClassifier):
        def loss(self, outputs, batch, *args, **kwargs):
            ce = super().loss(outputs, batch)
            return {'ce': ce, 'l2': 0.01 * outputs.pow(2).mean()}

    torch.manual_seed(0)
    student = TwoTermClassifier(nn.Linear(N_FEATURES, N_CLASSES), num_classes=N_CLASSES)
    logger = InMemoryLogger()
    fit(student, [Distillation(make_teacher(), org_loss_weight=1.0, kd_loss_weight=1.0)], loggers=[logger])
    last = {k.removeprefix('loss/train/'): v[-1][1] for k, v in logger.data.items() if k.startswith('loss/train/')}
    assert set(last) == {'ce', 'l2', 'original', 'kd', 'total'}
    assert last['original'] == pytest.approx(last['ce'] + last['l2'], rel=1e-5)
    assert last['total'] == pytest.approx(last['original'] + last['kd'], rel=1e-5)


def test_distillation_loss_masks_rows_and_refuses_non_scalar():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    loss = distillation_loss(student, teacher, KLDivergence(1.0), mask)
    assert loss.item() == pytest.approx(reference_kd(student[mask], teacher[mask], 1.0).item(), rel=1e-5)
    empty = distillation_loss(student.requires_grad_(), teacher, KLDivergence(1.0), torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match='scalar'):
        distillation_loss(student, teacher, nn.MSELoss(reduction='none'))


class MaskRecordingLoss(nn.Module):
    """A loss module whose forward takes ``mask``: it must be given the mask, not boolean-indexed rows."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, student, teacher, mask=None):
        self.masks.append(mask)
        kept = mask if mask is not None else torch.ones(student.shape[:-1], dtype=torch.bool)
        return ((student - teacher) ** 2).sum(-1)[kept].mean()


def test_distillation_loss_hands_the_mask_to_a_loss_module_that_takes_one():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    loss_fn = MaskRecordingLoss()
    loss = distillation_loss(student, teacher, loss_fn, mask)
    assert loss_fn.masks[0].shape == (2, 3) and torch.equal(loss_fn.masks[0], mask)  # whole logits, mask passed
    expected = ((student[mask] - teacher[mask]) ** 2).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    # Told, it skips reading the signature; a plain function without `mask` gets the selected rows.
    distillation_loss(student, teacher, loss_fn, mask, loss_takes_mask=True)
    assert len(loss_fn.masks) == 2
    rows = []
    distillation_loss(student, teacher, lambda s, t: rows.append(s.shape) or (s - t).pow(2).mean(), mask)
    assert rows == [(int(mask.sum()), 5)]


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'org_loss_weight': -0.1}, 'org_loss_weight must be a number >= 0'),
        ({'kd_loss_weight': -1}, 'kd_loss_weight must be a number >= 0'),
        ({'kd_loss_weight': float('nan')}, 'kd_loss_weight must be a number >= 0'),
        ({'org_loss_weight': 0, 'kd_loss_weight': 0.0}, 'both 0'),
        ({'n_teachers_to_sample': 2}, r'between 1 and the number of teachers \(1\)'),
        ({'n_teachers_to_sample': 0}, 'n_teachers_to_sample'),
        ({'start': '3xx'}, "start='3xx' is not a Composer time string"),
        ({'end': 1.5}, r'end=1.5.*\[0, 1\]'),
        ({'start': '5ba', 'end': '2ba'}, "end='2ba' must come after start='5ba'"),
        ({'kd_loss_fn': 3}, r'kd_loss_fn must be a loss name \(one of .* or a callable'),
        ({'on_nonfinite_teacher': 'ignore'}, "on_nonfinite_teacher must be 'raise' or 'skip'"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Distillation(make_teacher(), **kwargs)


def test_bad_temperature_is_refused():
    with pytest.raises(ValueError, match='temperature must be > 0'):
        Distillation(make_teacher(), KLDivergence(temperature=0))


def test_logit_shape_mismatch_fails_before_any_weight_changes():
    student = make_student()
    initial = copy.deepcopy(student.module.state_dict())
    with pytest.raises(ValueError, match=r'Teacher logits have shape \(8, 5\) but student logits have shape \(8, 4\)'):
        fit(student, [Distillation(make_teacher(n_classes=N_CLASSES + 1))])
    for key, value in student.module.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_unreadable_outputs_name_the_argument_to_pass():
    class OpaqueTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_teacher()

        def forward(self, x):
            return {'scores': self.net(x)}

    with pytest.raises(TypeError, match='teacher_logits_key'):
        fit(make_student(), [Distillation(OpaqueTeacher())])

    class DictStudent(ComposerClassifier):
        def forward(self, batch):
            return self.module(batch['features'])

        def loss(self, outputs, batch, *args, **kwargs):
            return outputs.pow(2).mean()

    torch.manual_seed(0)
    student = DictStudent(nn.Linear(N_FEATURES, N_CLASSES), num_classes=N_CLASSES)
    dict_batches = [{'features': torch.randn(4, N_FEATURES)}]
    with pytest.raises(TypeError, match='input_key'):
        fit(student, [Distillation(make_teacher())], dict_batches, '1ba', device_train_microbatch_size=4)


def test_teacher_sharing_the_students_parameters_is_refused():
    student = make_student()
    with pytest.raises(ValueError, match='shares parameters with the student'):
        fit(student, [Distillation(student.module)])


class FlakyTeacher(nn.Module):
    """A teacher whose logits turn non-finite on chosen calls."""

    def __init__(self, bad_calls: set[int], value: float):
        super().__init__()
        self.net = make_teacher()
        self.bad_calls, self.value, self.calls = bad_calls, value, 0

    def forward(self, x):
        out = self.net(x)
        if self.calls in self.bad_calls:
            out = out.clone()
            out[0, 1] = self.value
        self.calls += 1
        return out


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_nonfinite_teacher_output_raises_naming_the_step(value):
    student = make_student()
    after_batch = {}

    class Snapshot(Callback):
        def batch_end(self, state, logger):
            after_batch[int(state.timestamp.batch)] = copy.deepcopy(state.model.state_dict())

    with pytest.raises(FloatingPointError, match=r'NaN or \+inf logits at batch 2 \(epoch 0\)'):
        fit(student, [Distillation(FlakyTeacher({2}, value))], callbacks=[Snapshot()])
    assert sorted(after_batch) == [1, 2]  # batches 0 and 1 completed
    for key, tensor in student.state_dict().items():  # the poisoned batch never reached the weights
        assert torch.equal(tensor, after_batch[2][key]), key


def test_nonfinite_teacher_output_can_be_skipped_and_counted():
    logger, recorder = InMemoryLogger(), AfterLossRecorder()
    student = make_student()
    algorithm = Distillation(FlakyTeacher({1, 3}, float('nan')), org_loss_weight=0.5, on_nonfinite_teacher='skip')
    fit(student, [algorithm], loggers=[logger], callbacks=[recorder])
    kd = [step['loss']['kd'].item() for step in recorder.steps]
    assert kd[1] == 0.0 and kd[3] == 0.0 and kd[0] > 0 and kd[2] > 0
    for step in (recorder.steps[1], recorder.steps[3]):  # the model's own loss alone trains those steps
        assert step['loss']['total'].item() == pytest.approx(0.5 * step['loss']['original'].item())
    assert [v for _, v in logger.data['distillation/skipped_microbatches']] == [1, 2]
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_poisoned_logits_the_user_holds_are_left_as_they_were():
    """A teacher may hand back a tensor that lives on (here: a table of precomputed logits)."""

    class TableTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))
            self.table = torch.randn(8, N_CLASSES)
            self.table[3, 1] = float('nan')

        def forward(self, x):
            return self.table[: x.shape[0]]

    teacher = TableTeacher()
    before = teacher.table.clone()
    recorder = AfterLossRecorder()
    fit(make_student(), [Distillation(teacher, on_nonfinite_teacher='skip')], callbacks=[recorder])
    torch.testing.assert_close(teacher.table, before, rtol=0, atol=0, equal_nan=True)
    assert all(step['loss']['kd'].item() == 0.0 for step in recorder.steps)


def test_minus_inf_teacher_logits_are_legitimate():
    recorder = AfterLossRecorder()
    fit(make_student(), [Distillation(FlakyTeacher({0, 1, 2, 3}, -float('inf')))], callbacks=[recorder])
    assert all(torch.isfinite(step['loss']['kd']) for step in recorder.steps)
