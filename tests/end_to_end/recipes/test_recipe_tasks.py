"""The multi-task recipe form: data with several labels, one head per task, one named Distillation per task."""

from __future__ import annotations

import json

import pytest
import torch
from composer import Trainer
from conftest import EXAMPLES

from composer_kd import Distillation, MultiTaskClassifier
from composer_kd.cli import main
from composer_kd.losses import IGNORE_INDEX
from composer_kd.recipes import RecipeError, build_run, load_recipe
from composer_kd.run.reporting import distillation_ratio

RECIPE = str(EXAMPLES / 'digits_multitask.yaml')
TINY = [
    'progress_bar=false',
    'max_duration=6ba',
    'eval_interval=3ba',
    'teachers.0.train.max_duration=2ba',
    'teachers.1.train.max_duration=2ba',
    'teachers.0.channels=[4]',
    'teachers.0.hidden=[8]',
]


pytestmark = pytest.mark.usefixtures('one_thread')


def distillations(trainer: Trainer) -> list[Distillation]:
    return [a for a in trainer.state.algorithms if isinstance(a, Distillation)]


def refusal(source: str, overrides) -> str:
    with pytest.raises(RecipeError) as info:
        build_run(load_recipe(source, overrides), source=source)
    return str(info.value)


def test_the_example_recipe_builds_a_two_head_student_with_one_distillation_per_task():
    run = build_run(load_recipe(RECIPE, ['progress_bar=false']))
    assert isinstance(run.student, MultiTaskClassifier) and run.student.tasks == ['digit', 'parity']
    assert [t.tasks for t in run.teachers] == [['digit'], ['parity']]
    digit, parity = distillations(run.trainer)
    assert (digit.name, parity.name) == ('digit', 'parity')
    assert digit.teacher_modules == [run.teachers[0]] and parity.teacher_modules == [run.teachers[1]]
    assert (digit.kd_loss_fn.temperature, parity.kd_loss_fn.temperature) == (4.0, 2.0)
    assert (digit.kd_loss_weight, parity.kd_loss_weight) == (0.9, 0.9)
    # The student's own loss is weighted once: 0.1 on the first task's instance, 1.0 on the other.
    assert (digit.org_loss_weight, parity.org_loss_weight) == (0.1, 1.0)
    assert (digit.student_logits_key, parity.student_logits_key) == ('digit', 'parity')
    batch = next(iter(run.trainer.state.train_dataloader))
    assert set(batch) == {'inputs', 'digit', 'parity'} and batch['inputs'].shape == (64, 1, 8, 8)
    known = batch['digit'] != IGNORE_INDEX
    assert int(known.sum()) == 16 and torch.equal(batch['parity'] != IGNORE_INDEX, known)
    assert torch.equal(batch['parity'][known], batch['digit'][known] % 2)
    teacher_batch = next(iter(run.teacher_trainers[0].state.train_dataloader))
    assert bool((teacher_batch['digit'] != IGNORE_INDEX).all())  # teachers learn from every label


def test_a_task_without_teachers_is_taught_by_every_teacher_with_its_head():
    recipe = load_recipe(RECIPE, ['progress_bar=false', 'distillation.tasks=[{name: digit}, {name: parity}]'])
    run = build_run(recipe)
    digit, parity = distillations(run.trainer)
    assert digit.teacher_modules == [run.teachers[0]] and parity.teacher_modules == [run.teachers[1]]
    # The distillation section's temperature and weight are each task's defaults.
    assert digit.kd_loss_fn.temperature == parity.kd_loss_fn.temperature == recipe.distillation.temperature


def test_a_tiny_run_reports_each_task_and_its_ratio(tmp_path, capsys):
    summary_path = tmp_path / 'summary.json'
    code = main(['train', RECIPE, *TINY, f'--summary-json={summary_path}'])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    roles = [m['role'] for m in summary['models']]
    assert roles == ['teacher 0', 'teacher 1', 'student (distilled)', 'student alone']
    teacher_0, teacher_1, distilled, alone = summary['models']
    assert set(teacher_0['metrics']['val']) == {'accuracy/digit'}
    assert set(teacher_1['metrics']['val']) == {'accuracy/parity'}
    assert set(distilled['metrics']['test']) == {'accuracy/digit', 'accuracy/parity'}
    assert summary['metric'] == 'accuracy/digit' and summary['split'] == 'val'
    for teacher, task in ((teacher_0, 'digit'), (teacher_1, 'parity')):
        metric = f'accuracy/{task}'
        values = [m['metrics']['val'][metric] for m in (teacher, alone, distilled)]
        expected = distillation_ratio(*values)
        assert summary['ratios'].get(metric) == (pytest.approx(expected) if expected is not None else None)
        assert f'{100 * distilled["metrics"]["test"][metric]:.2f}%' in out
    assert 'val accuracy/parity' in out and 'student inference speed-up over teacher 0' in out


def test_reported_accuracy_of_each_head_matches_a_separate_evaluation():
    run = build_run(load_recipe(RECIPE, [*TINY, 'baseline=false']))
    summary = run.fit()
    val = run.data.splits['val']
    with torch.no_grad():
        outputs = run.student({'inputs': val.inputs})
    for task in ('digit', 'parity'):
        expected = (outputs[task].argmax(1) == val.labels[task]).float().mean().item()
        assert summary.value('student (distilled)', f'accuracy/{task}') == pytest.approx(expected)


@pytest.mark.parametrize(
    'overrides, expected',
    [
        (['data.digits.tasks=[digit, odd]'], "data.digits.tasks.1: unknown task 'odd'"),
        (
            ['data.digits.tasks=[digit, digit]', 'teachers.1.tasks=[digit]'],
            "data.digits.tasks.1: task 'digit' is listed",
        ),
        (['distillation.tasks=[]'], 'distillation.tasks: required with multi-task data (data.digits.tasks)'),
        (['distillation.tasks.0.name=digt'], "distillation.tasks.0.name: the student has no head 'digt'; did you mean"),
        (['distillation.tasks.1.teachers=[0]'], "distillation.tasks.1.teachers.0: teacher 0 has no head 'parity'"),
        (
            ['distillation.tasks.0.teachers=[5]'],
            'distillation.tasks.0.teachers.0: expected a teacher index from 0 to 1',
        ),
        (['distillation.tasks.0.temperature=-1'], 'distillation.tasks.0.temperature: expected a number > 0, got -1.0'),
        (['distillation.tasks.0.kd_loss_weight=-1'], 'distillation.tasks.0.kd_loss_weight: expected a number >= 0'),
        (['distillation.tasks.0.loss=kld'], "distillation.tasks.0.loss: unknown loss 'kld'"),
        (['distillation.tasks.1.name=digit'], "distillation.tasks.1.name: task 'digit' is already distilled by"),
        (['distillation.tasks.0.name=a/b'], 'distillation.tasks.0.name: expected letters, digits, _ and - only'),
        (['distillation.tasks.0.wieght=1'], 'distillation.tasks.0.wieght: unknown key'),
        (['distillation.tasks.0.teachers=first'], 'distillation.tasks.0.teachers: expected a list of integers'),
        (['teachers.1.tasks=[odd]'], "teachers.1.tasks.0: 'odd' is not a task of the data"),
        (['student.kind=torchvision', 'student.name=resnet18'], 'student.kind: multi-task data needs a model of kind'),
        (
            ['distillation.tasks=[{name: parity, teachers: []}]', 'teachers.1.tasks=[digit]'],
            "distillation.tasks.0.teachers: no teacher has a head 'parity'",
        ),
        (
            ["distillation.feature_pairs=[{student: '1', teacher: '1'}]"],
            'distillation.feature_pairs: cannot be combined with distillation.tasks',
        ),
        (
            ['distillation.schedules={temperature: {kind: linear, start_value: 8, end_value: 2}}'],
            "distillation.schedules.temperature: with distillation.tasks, set each task's temperature",
        ),
    ],
)
def test_bad_task_settings_are_refused_by_dotted_key(overrides, expected):
    assert expected in refusal(RECIPE, overrides)


def test_task_settings_on_single_task_data_are_refused_by_dotted_key():
    message = refusal('digits', ['distillation.tasks=[{name: digit}]', 'student.tasks=[digit]'])
    assert 'distillation.tasks: needs multi-task data: name the tasks in data.digits.tasks' in message
    assert 'student.tasks: needs multi-task data' in message
