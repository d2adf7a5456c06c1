"""Multi-task distillation: named Distillation instances, one per head, each with its own teacher and settings."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from composer import Callback, Trainer
from composer.loggers import InMemoryLogger
from composer_kd.data import IGNORE_INDEX, MultiTaskDataset, digits_multitask, load_digits_splits
from conftest import N_FEATURES, AfterLossRecorder
from conftest import fit as fit_on
from torch import nn
from torch.utils.data import DataLoader

from composer_kd import (
    CombinedLoss,
    Distillation,
    IndexedDataset,
    KLDivergence,
    LinearSchedule,
    TeacherCache,
    combine_losses,
)
from composer_kd.multitask import DistillationTask, MultiTaskClassifier, task_distillations

CLASSES = {'digit': 5, 'parity': 2}


def reference_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_rows sum_c p_c (log p_c - log q_c), in float64."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    return temperature**2 * (p * (p.log() - q.log())).sum(-1).mean()


def make_data(n: int = 32, seed: int = 3) -> MultiTaskDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=generator)
    return MultiTaskDataset(
        x,
        {
            'digit': torch.randint(0, 5, (n,), generator=generator),
            'parity': torch.randint(0, 2, (n,), generator=generator),
        },
    )


def make_student(seed: int = 5) -> MultiTaskClassifier:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.Tanh())
    return MultiTaskClassifier(trunk, {task: nn.Linear(8, n) for task, n in CLASSES.items()})


def make_teachers(seed: int = 9) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {task: nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, n)) for task, n in CLASSES.items()}


def fit(student, algorithms, callbacks=(), loggers=(), max_duration='1ep', data=None) -> Trainer:
    loader = DataLoader(data or make_data(), batch_size=8)
    return fit_on(student, algorithms, loader, max_duration, callbacks, loggers=list(loggers))


def two_tasks(teachers, org=(0.3, 1.0), kd=(0.7, 0.4), temperatures=(2.0, 5.0)) -> list[Distillation]:
    return [
        Distillation(
            teachers[task],
            KLDivergence(temperature=t),
            org_loss_weight=o,
            kd_loss_weight=w,
            student_logits_key=task,
            input_key='inputs',
            name=task,
        )
        for task, o, w, t in zip(CLASSES, org, kd, temperatures, strict=True)
    ]


@pytest.mark.parametrize('org', [(0.3, 1.0), (1.0, 0.3), (0.5, 0.4)])
def test_total_loss_is_the_model_loss_weighted_once_plus_each_task_term(org):
    teachers = make_teachers()
    recorder = AfterLossRecorder()
    fit(make_student(), two_tasks(teachers, org=org), callbacks=[recorder])
    assert len(recorder.steps) == 4
    for step in recorder.steps:
        batch, outputs, loss = step['batch'], step['outputs'], step['loss']
        assert set(loss) == {'ce/digit', 'ce/parity', 'original', 'kd/digit', 'kd/parity', 'total'}
        ce = {task: F.cross_entropy(outputs[task].double(), batch[task]) for task in CLASSES}
        kd_digit = reference_kd(outputs['digit'], teachers['digit'](batch['inputs']), 2.0)
        kd_parity = reference_kd(outputs['parity'], teachers['parity'](batch['inputs']), 5.0)
        assert loss['ce/digit'].item() == pytest.approx(ce['digit'].item(), rel=1e-5)
        assert loss['original'].item() == pytest.approx((ce['digit'] + ce['parity']).item(), rel=1e-5)
        assert loss['kd/digit'].item() == pytest.approx(kd_digit.item(), rel=1e-5)
        assert loss['kd/parity'].item() == pytest.approx(kd_parity.item(), rel=1e-5)
        # The model's own loss once, weighted by the product of the instances' org_loss_weight.
        total = org[0] * org[1] * (ce['digit'] + ce['parity']) + 0.7 * kd_digit + 0.4 * kd_parity
        assert loss['total'].item() == pytest.approx(total.item(), rel=1e-5)


def test_each_teacher_reaches_only_its_own_head():
    teachers = make_teachers()
    student = make_student()
    initial = copy.deepcopy(student)
    grads = {}

    class GradCatcher(Callback):
        def after_backward(self, state, logger):
            if not grads:
                grads.update({n: p.grad.clone() for n, p in state.model.named_parameters()})

    data = make_data()
    fit(student, two_tasks(teachers), callbacks=[GradCatcher()], data=data)
    batch = next(iter(DataLoader(data, batch_size=8)))
    x = batch['inputs']

    def head_grads(task: str, terms) -> dict[str, torch.Tensor]:
        """Gradients of one head's parameters from the given terms, computed afresh from the initial model."""
        model = copy.deepcopy(initial)
        outputs = model(batch)
        sum(terms(outputs)).backward()
        return {n: p.grad for n, p in model.named_parameters() if n.startswith(f'heads.{task}.')}

    digit_only = head_grads(
        'digit',
        lambda out: [
            0.3 * F.cross_entropy(out['digit'], batch['digit']),
            0.7 * reference_kd(out['digit'], teachers['digit'](x).detach(), 2.0).float(),
        ],
    )
    parity_only = head_grads(
        'parity',
        lambda out: [
            0.3 * F.cross_entropy(out['parity'], batch['parity']),
            0.4 * reference_kd(out['parity'], teachers['parity'](x).detach(), 5.0).float(),
        ],
    )
    for name, expected in {**digit_only, **parity_only}.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-7)
    # Teacher B's term does reach the shared trunk: the trunk's gradient differs without it.
    without_parity_teacher = copy.deepcopy(initial)
    out = without_parity_teacher(batch)
    (
        0.3 * (F.cross_entropy(out['digit'], batch['digit']) + F.cross_entropy(out['parity'], batch['parity']))
        + 0.7 * reference_kd(out['digit'], teachers['digit'](x).detach(), 2.0).float()
    ).backward()
    assert not torch.allclose(grads['trunk.0.weight'], without_parity_teacher.trunk[0].weight.grad)


def test_teachers_stay_unchanged_and_each_is_frozen_only_for_the_fit():
    teachers = make_teachers()
    before = {task: copy.deepcopy(t.state_dict()) for task, t in teachers.items()}
    fit(make_student(), two_tasks(teachers))
    for task, teacher in teachers.items():
        assert all(torch.equal(v, before[task][k]) for k, v in teacher.state_dict().items())
        assert teacher.training and all(p.requires_grad for p in teacher.parameters())


def test_per_task_terms_and_schedules_are_logged_under_the_task_name():
    teachers = make_teachers()
    logger = InMemoryLogger()
    algorithms = two_tasks(teachers)
    algorithms[1] = Distillation(
        teachers['parity'],
        temperature=LinearSchedule(8.0, 2.0),
        kd_loss_weight=LinearSchedule(1.0, 0.0),
        student_logits_key='parity',
        input_key='inputs',
        name='parity',
    )
    fit(make_student(), algorithms, loggers=[logger])
    keys = set(logger.data)
    assert {'loss/train/kd/digit', 'loss/train/kd/parity', 'loss/train/ce/digit', 'loss/train/original'} <= keys
    assert 'loss/train/kd' not in keys
    temperatures = [value for _, value in logger.data['distillation/parity/temperature']]
    assert temperatures == pytest.approx([8.0, 6.5, 5.0, 3.5])
    assert 'distillation/parity/kd_loss_weight' in keys and 'distillation/temperature' not in keys
    assert not any(key.startswith('distillation/digit/') for key in keys)  # nothing of digit's is scheduled


def test_instances_sharing_a_name_are_refused_when_the_trainer_is_built():
    teachers = make_teachers()
    unnamed = [Distillation(teachers[t], student_logits_key=t, input_key='inputs') for t in CLASSES]
    with pytest.raises(ValueError, match=r'both named None.*distinct name='):
        fit(make_student(), unnamed)
    with pytest.raises(ValueError, match='name must be a non-empty string'):
        Distillation(teachers['digit'], name='a/b')


def test_combine_losses_adds_a_second_instance_on_top_of_the_first():
    original = {'ce': torch.tensor(2.0), 'aux': torch.tensor(1.0)}
    first = combine_losses(original, torch.tensor(4.0), 0.5, 0.25, name='a')
    assert isinstance(first, CombinedLoss) and first.weights == {'original': 0.5, 'kd/a': 0.25}
    second = combine_losses(
        first, torch.tensor(8.0), 0.2, 0.75, extra_terms={'feature_0': (torch.tensor(3.0), 2.0)}, name='b'
    )
    expected = 0.5 * 0.2 * (2.0 + 1.0) + 0.25 * 4.0 + 0.75 * 8.0 + 2.0 * 3.0
    assert second['total'].item() == pytest.approx(expected)
    assert {k: v.item() for k, v in second.items() if k != 'total'} == {
        'ce': 2.0,
        'aux': 1.0,
        'original': 3.0,
        'kd/a': 4.0,
        'kd/b': 8.0,
        'feature_0/b': 3.0,
    }
    with pytest.raises(ValueError, match="write the loss term 'kd/b'"):
        combine_losses(second, torch.tensor(1.0), 1.0, 1.0, name='b')
    # A model's own term named like a distillation term is kept under another name, not overwritten.
    clash = combine_losses({'kd': torch.tensor(1.0)}, torch.tensor(2.0), 1.0, 1.0)
    assert clash['original_kd'].item() == 1.0 and clash['kd'].item() == 2.0


def test_a_bare_tensor_teacher_teaches_the_head_the_student_key_names():
    # The teacher returns a tensor; the student's key 'digit' chooses the student's head only.
    teachers = make_teachers()
    recorder = AfterLossRecorder()
    distillation = Distillation(teachers['digit'], KLDivergence(1.0), student_logits_key='digit', input_key='inputs')
    fit(make_student(), [distillation], callbacks=[recorder])
    step = recorder.steps[0]
    expected = reference_kd(step['outputs']['digit'], teachers['digit'](step['batch']['inputs']), 1.0)
    assert step['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_task_distillations_weight_the_model_loss_once_and_name_bad_tasks():
    teachers = make_teachers()
    algorithms = task_distillations(
        [
            DistillationTask('digit', teachers['digit'], kd_loss_weight=0.7, temperature=2.0, options={'input_key': 0}),
            {'name': 'parity', 'teachers': teachers['parity'], 'temperature': 5, 'options': {'input_key': 0}},
        ],
        org_loss_weight=0.3,
    )
    assert [(a.name, a.org_loss_weight, a.kd_loss_weight) for a in algorithms] == [
        ('digit', 0.3, 0.7),
        ('parity', 1.0, 1.0),
    ]
    assert [a.kd_loss_fn.temperature for a in algorithms] == [2.0, 5]
    assert [a.student_logits_key for a in algorithms] == ['digit', 'parity']
    with pytest.raises(ValueError, match=r"tasks\[1\]: the task name 'digit' is used twice"):
        task_distillations([{'name': 'digit', 'teachers': teachers['digit']}] * 2)
    with pytest.raises(TypeError, match=r"tasks\[0\]: .*unexpected keyword argument 'weight'"):
        task_distillations([{'name': 'digit', 'teachers': teachers['digit'], 'weight': 1.0}])
    with pytest.raises(ValueError, match=r'tasks\[0\]: temperature must be'):
        task_distillations([{'name': 'digit', 'teachers': teachers['digit'], 'temperature': -1.0}])
    with pytest.raises(ValueError, match='tasks: expected at least one task'):
        task_distillations([])


def test_multi_task_classifier_reads_each_task_s_labels_and_skips_hidden_ones():
    student = make_student()
    batch = {
        'inputs': torch.randn(4, N_FEATURES),
        'digit': torch.tensor([0, 1, IGNORE_INDEX, 3]),
        'parity': torch.tensor([IGNORE_INDEX] * 4),
    }
    outputs = student(batch)
    losses = student.loss(outputs, batch)
    known = torch.tensor([0, 1, 3])
    assert losses['ce/digit'].item() == pytest.approx(
        F.cross_entropy(outputs['digit'][known], batch['digit'][known]).item()
    )
    assert losses['ce/parity'].item() == 0.0
    metrics = student.get_metrics()
    assert set(metrics) == {'accuracy/digit', 'accuracy/parity'}
    student.update_metric(batch, outputs, metrics['accuracy/digit'])
    predicted = outputs['digit'].argmax(-1)[known]
    assert metrics['accuracy/digit'].compute().item() == pytest.approx(
        (predicted == batch['digit'][known]).float().mean().item()
    )
    with pytest.raises(KeyError, match=r"no labels for task\(s\) \['parity'\]"):
        student.loss(outputs, {'inputs': batch['inputs'], 'digit': batch['digit']})


def test_digit_tasks_are_facts_about_the_digit_and_hidden_labels_stay_hidden():
    splits = load_digits_splits(per_class=3, keep_unlabelled=True)
    data = digits_multitask(splits.train, ['digit', 'parity', 'at_least_5'])
    digits = splits.train.tensors[1]
    known = digits != IGNORE_INDEX
    assert torch.equal(data.labels['digit'], digits)
    assert torch.equal(data.labels['parity'][known], digits[known] % 2)
    assert torch.equal(data.labels['at_least_5'][known], (digits[known] >= 5).long())
    for task in ('parity', 'at_least_5'):
        assert torch.all(data.labels[task][~known] == IGNORE_INDEX)
    example = data[0]
    assert set(example) == {'inputs', 'digit', 'parity', 'at_least_5'} and example['inputs'].shape == (1, 8, 8)
    with pytest.raises(ValueError, match='tasks: expected names among digit, parity, at_least_5'):
        digits_multitask(splits.train, ['odd'])
    with pytest.raises(ValueError, match=r"labels\['a'\] has 2 entries for 3 inputs"):
        MultiTaskDataset(torch.zeros(3, 1), {'a': torch.zeros(2)})


def test_precomputed_cache_serves_a_bare_tensor_teacher_of_one_head():
    """A single-task teacher (bare tensor output) teaches the 'digit' head from a cache filled before training."""
    teacher = make_teachers()['digit']
    data = IndexedDataset(make_data())
    cache = TeacherCache().precompute(
        teacher, DataLoader(data, batch_size=8), device='cpu', input_key='inputs', student_logits_key='digit'
    )
    assert cache.n_recorded == len(data)
    teacher_calls = []
    teacher.register_forward_hook(lambda module, args, output: teacher_calls.append(1))
    distillation = Distillation(
        teacher, KLDivergence(temperature=2.0), student_logits_key='digit', input_key='inputs', teacher_cache=cache
    )
    recorder = AfterLossRecorder()
    fit(make_student(), [distillation], callbacks=[recorder], data=data)
    assert not teacher_calls  # every microbatch was served from the cache, which the fit accepted as its own
    for step in recorder.steps:
        expected = reference_kd(step['outputs']['digit'], teacher(step['batch']['inputs']), 2.0)
        torch.testing.assert_close(step['loss']['kd'].double(), expected, rtol=1e-5, atol=1e-6)
