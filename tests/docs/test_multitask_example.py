"""examples/multitask_distillation.py in a tiny setting: its report, its loss formula, its validation search."""

from __future__ import annotations

import copy
import importlib.util
import statistics
import sys

import pytest
import torch
from composer import Callback, Trainer
from conftest import EXAMPLES

from composer_kd.run.reporting import distillation_ratio

EXAMPLE = EXAMPLES / 'multitask_distillation.py'
TINY = ['--teacher-epochs', '1', '--student-batches', '4', '--device', 'cpu']


@pytest.fixture(scope='module')
def example():
    spec = importlib.util.spec_from_file_location('composer_kd_example_multitask', EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() runs on one thread; give the other tests theirs back


def test_report_is_consistent_and_the_loss_is_each_task_s_term_on_the_labels_once(example):
    printed = []
    results = example.main(['--seeds', '2', *TINY], echo=printed.append)
    settings = results['settings']
    assert settings == example.DEFAULTS and results['seeds'] == [0, 1]
    for run in results['runs']:
        losses = run['losses']
        w = settings['kd_loss_weight']
        assert losses['original'] == pytest.approx(losses['ce/digit'] + losses['ce/parity'], rel=1e-5)
        expected = (1 - w) * losses['original'] + w * losses['kd/digit'] + w * losses['kd/parity']
        assert losses['total'] == pytest.approx(expected, rel=1e-5)
    for task, row in results['tasks'].items():
        for model in ('teacher', 'student_alone', 'student_distilled'):
            per_seed = [run['test'][model][task] for run in results['runs']]
            assert row['test_accuracy'][model]['mean'] == pytest.approx(statistics.fmean(per_seed))
            assert all(0.0 <= v <= 1.0 for v in per_seed)
        means = {m: row['test_accuracy'][m]['mean'] for m in row['test_accuracy']}
        assert row['distillation_ratio'] == distillation_ratio(
            means['teacher'], means['student_alone'], means['student_distilled']
        )
    assert printed[-1] == example.format_results(results)


def test_accuracy_is_the_share_of_correct_predictions_per_head(example):
    data = example.load_data(per_class=10)
    torch.manual_seed(0)
    student = example.student_model()
    accuracy = example.accuracy(student, data['test'])
    with torch.no_grad():
        outputs = student({'inputs': data['test'].inputs})
    assert set(accuracy) == {'digit', 'parity'}
    for task, value in accuracy.items():
        predicted, labels = outputs[task].argmax(1).tolist(), data['test'].labels[task].tolist()
        correct = sum(int(p == t) for p, t in zip(predicted, labels, strict=True))
        assert value == pytest.approx(correct / len(data['test']))
    assert int((data['train'].labels['digit'] != -100).sum()) == 100 and len(data['teacher_train']) == 897


def test_the_sweep_chooses_on_validation(example):
    printed = []
    results = example.main(['--sweep', '--sweep-seeds', '1', '--seeds', '1', *TINY], echo=printed.append)
    search = results['sweep']
    best_lr = max(search['student_alone'], key=search['student_alone'].get)
    best = max(search['distilled'], key=lambda row: row['val_accuracy'])
    assert all(row['lr'] == best_lr for row in search['distilled'])
    assert len(search['distilled']) == 3 * 3 * 2
    assert search['chosen'] == results['settings'] == {k: best[k] for k in example.DEFAULTS}


def test_both_students_of_a_seed_start_from_the_same_weights_and_see_the_same_batches(example, monkeypatch):
    """What docs/multitask.md says of the example: per seed, the student alone and the distilled student differ only
    by the ``Distillation`` instances."""
    students = []

    class Recorder(Callback):
        def __init__(self):
            self.initial: dict[str, torch.Tensor] = {}
            self.batches: list = []
            self.algorithms: list[str] = []

        def fit_start(self, state, logger):
            self.initial = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
            self.algorithms = [type(a).__name__ for a in state.algorithms]

        def batch_start(self, state, logger):
            self.batches.append(copy.deepcopy(state.batch))

    class RecordingTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            if 'algorithms' in kwargs:  # the students' trainers; the teachers' pass none
                students.append(Recorder())
                kwargs['callbacks'] = [students[-1]]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(example, 'Trainer', RecordingTrainer)
    example.main(['--seeds', '2', *TINY], echo=lambda line: None)
    # Per seed: the student alone, then the distilled one.
    assert [s.algorithms for s in students] == [[], ['Distillation', 'Distillation']] * 2
    for alone, distilled in (students[0:2], students[2:4]):
        assert alone.initial.keys() == distilled.initial.keys()
        assert all(torch.equal(alone.initial[k], distilled.initial[k]) for k in alone.initial)
        assert len(alone.batches) == len(distilled.batches) == 4
        for a, b in zip(alone.batches, distilled.batches, strict=True):
            assert a.keys() == b.keys() == {'inputs', 'digit', 'parity'}  # the image and each task's labels
            assert all(torch.equal(a[key], b[key]) for key in a)
    # And the seeds differ from one another, in both.
    assert not torch.equal(students[0].batches[0]['inputs'], students[2].batches[0]['inputs'])
    assert not all(torch.equal(students[0].initial[k], students[2].initial[k]) for k in students[0].initial)
