"""The stages ``distill()`` runs in, and the pieces that run teachers the way a fit runs them, each checked against
what it should give written out, without training."""

from __future__ import annotations

import inspect

import pytest
import torch
from composer.algorithms import LabelSmoothing
from torch import nn
from torch.utils.data import TensorDataset

from composer_kd.losses import JensenShannonDivergence, KLDivergence
from composer_kd.models.speed import _interleaved
from composer_kd.models.teachers import TeacherInference, TeacherRunner, teacher_output
from composer_kd.options import CONFLICTS
from composer_kd.run.api import (
    _check_arguments,
    _Data,
    _prepare_data,
    _resolve_models,
    _speed_batch,
    _splits_to_report,
    _Training,
    distill,
)
from composer_kd.run.search import Candidate, SearchSpec
from composer_kd.schedules import LinearSchedule
from composer_kd.signal.writer import _token_ids


def training(**changes) -> _Training:
    settings = dict(
        max_duration='2ba',
        optimizer='SGD',
        lr=0.1,
        weight_decay=0.0,
        seed=3,
        device='cpu',
        precision=None,
        progress_bar=False,
        trainer_kwargs={},
    )
    return _Training(**{**settings, **changes})


def plan(options=None, search=None, tasks_given=False, trainer_kwargs=None, **changes):
    """The plan ``_check_arguments`` makes of ``distill``'s arguments: its defaults, small settings, ``changes``."""
    defaults = {
        name: p.default for name, p in inspect.signature(distill).parameters.items() if p.default is not p.empty
    }
    settings = dict(training().__dict__, temperature=2.0, org_loss_weight=0.5, kd_loss_weight=0.9, batch_size=8)
    arguments = {
        **defaults,
        **settings,
        'eval_batch_size': 16,
        'options': options or {},
        'search': search,
        'tasks': [] if tasks_given else None,
        'trainer_kwargs': trainer_kwargs or {},
    }
    return _check_arguments({**arguments, **changes})


def conflict_message(first: str, second: str) -> str:
    return next(c for c in CONFLICTS if (c.first, c.second) == (first, second)).message()


def test_the_plan_holds_the_checked_arguments_and_the_loss_at_a_constant_temperature():
    smoothing = LabelSmoothing(0.1)
    checked = plan(algorithms=smoothing, trainer_kwargs={'device_train_microbatch_size': 4})
    assert checked.algorithms == [smoothing]  # one algorithm given alone becomes a list
    assert isinstance(checked.kd_loss_fn, KLDivergence) and checked.kd_loss_fn.temperature == 2.0
    assert checked.training.trainer_kwargs == {'device_train_microbatch_size': 4}
    assert checked.training.trainer_arguments() == {
        'max_duration': '2ba',
        'seed': 3,
        'precision': None,
        'device': 'cpu',
        'progress_bar': False,
        'device_train_microbatch_size': 4,
    }
    # A scheduled temperature is Distillation's to apply; the loss keeps its own, KLDivergence's 4.0.
    scheduled = plan(temperature=LinearSchedule(1.0, 4.0))
    assert scheduled.kd_loss_fn.temperature == KLDivergence().temperature == 4.0


def test_the_new_optimizer_is_of_the_kind_and_settings_given():
    model = nn.Linear(3, 2)
    optimizer = training(optimizer='SGD', lr=0.25, weight_decay=0.01).new_optimizer(model)
    assert type(optimizer) is torch.optim.SGD
    assert (optimizer.defaults['lr'], optimizer.defaults['weight_decay']) == (0.25, 0.01)
    assert [p for group in optimizer.param_groups for p in group['params']] == list(model.parameters())


def test_a_distillation_gets_this_call_s_settings_or_a_candidate_s():
    checked = plan()
    checked.teachers = [nn.Linear(3, 2)]
    own = checked.distillation()
    assert own.kd_loss_fn is checked.kd_loss_fn
    assert (own.kd_loss_weight, own.org_loss_weight) == (0.9, 0.5)
    chosen = checked.distillation(Candidate('js', 1.5, 0.3, 0.7))
    assert isinstance(chosen.kd_loss_fn, JensenShannonDivergence) and chosen.kd_loss_fn.temperature == 1.5
    assert (chosen.kd_loss_weight, chosen.org_loss_weight) == (0.3, 0.7)


@pytest.mark.parametrize(
    ('options', 'tasks_given', 'pair'),
    [({}, True, ('search', 'tasks')), ({'teacher_cache': object()}, False, ('search', 'teacher_cache'))],
)
def test_a_search_is_refused_beside_what_the_table_says_it_does_not_combine_with(options, tasks_given, pair):
    with pytest.raises(ValueError) as info:
        plan(options=options, search={'temperature': [1.0, 2.0]}, tasks_given=tasks_given)
    assert str(info.value) == conflict_message(*pair)


def test_a_search_s_spec_fills_what_it_leaves_out_with_this_call_s_settings():
    checked = plan(search={'temperature': [1.0, 4.0], 'max_duration': '1ba'})
    assert [(c.kd_loss, c.temperature, c.kd_loss_weight, c.org_loss_weight) for c in checked.search.candidates] == [
        ('kl', 1.0, 0.9, 0.5),
        ('kl', 4.0, 0.9, 0.5),
    ]
    assert checked.search.max_duration == '1ba' and checked.training.max_duration == '2ba'


def test_unknown_names_get_the_nearest_known_one():
    with pytest.raises(TypeError, match=r"argument 'temprature'; did you mean 'temperature'\? \(besides its own"):
        plan(options={'temprature': 1.0})
    with pytest.raises(TypeError, match=r"Trainer has no argument 'sead'; did you mean 'seed'\?$"):
        plan(trainer_kwargs={'sead': 1})
    with pytest.raises(ValueError, match=r"device: unknown value 'CPU'; did you mean 'cpu'\?"):
        plan(device='CPU')
    with pytest.raises(ValueError, match=r"search\[kd_loss\]\[1\]: unknown loss 'jss'; did you mean 'js'\?"):
        plan(search={'kd_loss': ['kl', 'jss']})


def test_task_teachers_are_resolved_in_task_order_on_copies_of_the_tasks():
    digit, parity, parity_too = nn.Linear(4, 10), nn.Linear(4, 2), nn.Linear(4, 2)
    tasks = [{'name': 'digit', 'teachers': digit}, {'name': 'parity', 'teachers': [parity, parity_too]}]
    teachers, resolved = _resolve_models(None, nn.Linear(4, 3), tasks, {})
    assert [id(t) for t in teachers] == [id(digit), id(parity), id(parity_too)]
    assert [task.name for task in resolved] == ['digit', 'parity']
    assert resolved[1].teachers == [parity, parity_too] and tasks[1]['teachers'] == [parity, parity_too]


def test_a_teacher_sharing_the_student_s_parameters_is_named_by_its_index():
    student = nn.Linear(4, 3)
    sharing = nn.Sequential(nn.Linear(4, 4), student)
    with pytest.raises(ValueError, match=r'^teachers\[1\] shares parameters with the student being trained'):
        _resolve_models([nn.Linear(4, 3), sharing], student, None, {})


def test_the_split_chosen_on_is_reported_last():
    splits = {'val': 'v', 'test': 't', 'ood': 'o'}
    assert list(_splits_to_report(splits, 'val').items()) == [('test', 't'), ('ood', 'o'), ('val', 'v')]
    assert list(_splits_to_report(splits, 'ood').items()) == [('val', 'v'), ('test', 't'), ('ood', 'o')]


def test_data_are_batched_as_asked_and_checked_on_their_first_batch():
    x, y = torch.arange(40.0).reshape(20, 2), torch.arange(20) % 3
    data = TensorDataset(x, y)
    search = SearchSpec([], '1ba', split='val')
    prepared = _prepare_data(nn.Linear(2, 3), data, {'val': data, 'test': data}, 8, 5, 0, search)
    assert list(prepared.splits) == ['test', 'val']
    assert prepared.sample[0].shape == (8, 2)
    evaluated = next(iter(prepared.splits['test']))
    assert torch.equal(evaluated[0], x[:5]) and torch.equal(evaluated[1], y[:5])  # evaluation data in order
    with pytest.raises(ValueError, match="'val' is not an evaluation split"):
        _prepare_data(nn.Linear(2, 3), data, data, 8, 5, 0, search)


def test_inference_is_timed_on_the_first_evaluation_batch_or_else_the_first_training_batch():
    x = torch.arange(12.0).reshape(6, 2)
    loaders = {'test': [(x[3:], 'test labels')], 'val': [(x[:3], 'val labels')]}
    teachers = [(nn.Linear(2, 3), nn.Linear(2, 3), 'Linear')]
    with_splits, without = _Data(None, loaders, 'sample'), _Data(None, {}, 'sample')
    assert _speed_batch(True, with_splits, teachers) is loaders['test'][0]  # the headline split's
    assert _speed_batch(True, without, teachers) == 'sample'
    assert _speed_batch(False, with_splits, teachers) is None
    assert _speed_batch(True, with_splits, [(nn.Linear(2, 3), None, 'Linear')]) is None  # not evaluated, not timed


def test_token_ids_are_stacked_and_refused_outside_the_vocabulary_or_of_mixed_lengths():
    rows = [torch.tensor([1, 2, 3]).numpy(), torch.tensor([4, 5, 6]).numpy()]
    assert torch.equal(_token_ids(rows, 0, vocab=7), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(ValueError, match=r'sequences 10..11 hold token id 6 outside the teacher.s vocabulary of 6'):
        _token_ids(rows, 10, vocab=6)
    with pytest.raises(ValueError, match=r'sequences 4..5 have different lengths'):
        _token_ids([rows[0], rows[1][:2]], 4, vocab=7)


def test_interleaved_timings_warm_up_twice_per_round_and_keep_each_timer_s_own():
    calls = []

    def timer(name):
        def timed():
            calls.append(name)
            return float(len(calls))

        return timed

    timings = _interleaved({'a': timer('a'), 'b': timer('b')}, repeats=6, rounds=2)
    assert calls == ['a'] * 5 + ['b'] * 5 + ['a'] * 5 + ['b'] * 5  # 2 warm-ups then 6 // 2 timings, in turn
    assert timings == {'a': [3.0, 4.0, 5.0, 13.0, 14.0, 15.0], 'b': [8.0, 9.0, 10.0, 18.0, 19.0, 20.0]}


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.digit, self.parity = nn.Linear(4, 10), nn.Linear(4, 2)

    def forward(self, x):
        return {'digit': self.digit(x), 'parity': self.parity(x)}


def test_teacher_output_is_the_whole_output_of_the_teacher_run_in_eval_mode():
    torch.manual_seed(0)
    teacher = TwoHeads().train()
    inputs = torch.randn(3, 4)
    with torch.no_grad():
        output = teacher_output(teacher, {'inputs': inputs, 'labels': None}, input_key='inputs')
        assert not teacher.training
        assert set(output) == {'digit', 'parity'}
        torch.testing.assert_close(output['parity'], teacher.parity(inputs))


def test_teacher_output_runs_a_runner_on_adapted_inputs_and_names_a_failing_teacher():
    teacher = nn.Linear(4, 3).eval().requires_grad_(False)
    runner = TeacherRunner(teacher, TeacherInference(dtype=torch.bfloat16))
    runner.prepare()
    inputs = torch.randn(2, 4)
    with torch.no_grad():
        assert teacher_output(runner, inputs).dtype == torch.bfloat16
    runner.release()
    with pytest.raises(RuntimeError, match=r'^teachers\[2\] \(Linear\) failed on the batch it was given'):
        teacher_output(teacher, torch.randn(2, 5), index=2)
