"""``composer-kd demo`` in a reduced setting: its table, JSON report and plot, and the pieces they rest on."""

from __future__ import annotations

import contextlib
import io
import json

import matplotlib.image
import pytest
import torch
from composer.models import ComposerClassifier

from composer_kd.cli import main
from composer_kd.cli.demo import format_report, measure_speedup

# One seed and a few batches: the whole demo machinery in seconds.
REDUCED = ['--seeds', '1', 'max_duration=20ba', 'teachers.0.train.max_duration=2ep', 'eval_interval=10ba']
STATS = {'mean', 'std', 'min', 'max', 'per_seed'}


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp('demo')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(['demo', '--output-dir', str(output_dir), *REDUCED])
    report = json.loads((output_dir / 'report.json').read_text())
    return code, printed.getvalue(), report, output_dir


def test_demo_runs_and_writes_its_report_and_plot(demo):
    code, printed, report, output_dir = demo
    assert code == 0
    assert report['files'] == {'report': str(output_dir / 'report.json'), 'plot': str(output_dir / 'accuracy.png')}
    image = matplotlib.image.imread(output_dir / 'accuracy.png')
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


def test_report_has_every_field(demo):
    _, _, report, _ = demo
    assert set(report) >= {
        'dataset',
        'seeds',
        'models',
        'distillation_ratio',
        'distilled_minus_alone',
        'distilled_beats_alone',
        'inference',
        'recipe',
        'wall_seconds',
        'files',
        'curves',
        'environment',
    }
    assert report['seeds'] == [0]
    assert report['dataset']['labelled_train_images'] == 100 and report['dataset']['unlabelled_train_images'] == 797
    assert report['dataset']['test_images'] == 540 and report['dataset']['val_images'] == 360
    assert report['dataset']['teacher_labelled_train_images'] == 897
    models = report['models']
    assert list(models) == ['teacher', 'student_alone', 'student_distilled']
    assert models['teacher']['parameters'] == 151_306 and models['student_alone']['parameters'] == 2_410
    for model in models.values():
        for key in ('test_accuracy', 'val_accuracy', 'train_seconds'):
            assert set(model[key]) == STATS and len(model[key]['per_seed']) == 1
        assert 0.0 < model['test_accuracy']['mean'] <= 1.0 and model['test_accuracy']['std'] == 0.0
    assert report['recipe']['max_duration'] == '20ba' and report['recipe']['seed'] == 0
    assert report['inference']['speedup'] > 1.0  # a 63x smaller network is faster even when timings are noisy


def test_report_numbers_are_consistent(demo):
    _, _, report, _ = demo
    test = {name: m['test_accuracy']['mean'] for name, m in report['models'].items()}
    ratio = (test['student_distilled'] - test['student_alone']) / (test['teacher'] - test['student_alone'])
    assert report['distillation_ratio']['of_means'] == pytest.approx(ratio)
    gain = test['student_distilled'] - test['student_alone']
    assert report['distilled_minus_alone']['mean'] == pytest.approx(gain)
    assert report['distilled_beats_alone'] == (gain > 0)
    inference = report['inference']
    assert inference['speedup'] == pytest.approx(inference['speedup_per_seed'][0])
    # Curves: test accuracy every 10 batches for the students, ending at what the table reports.
    for name in ('student_alone', 'student_distilled'):
        (curve,) = report['curves'][name]
        assert [batch for batch, _ in curve] == [10, 20]
        assert curve[-1][1] == pytest.approx(test[name])


def test_printed_table_shows_the_reported_numbers(demo):
    _, printed, report, _ = demo
    assert printed.startswith('seed 0: test accuracy teacher')
    assert format_report(report) in printed
    for name in ('teacher', 'student alone', 'student (distilled)'):
        key = name.replace(' ', '_').replace('(', '').replace(')', '')
        model = report['models'][key]
        row = next(line for line in printed.splitlines() if line.startswith(name + ' '))
        assert f'{100 * model["test_accuracy"]["mean"]:.2f}% ± 0.00' in row
        assert f'{model["parameters"]:,}' in row
    assert f'{report["inference"]["speedup"]:.1f}x' in printed
    assert 'distillation ratio (distilled - alone) / (teacher - alone):' in printed


def test_speedup_compares_the_two_models_interleaved():
    big = ComposerClassifier(
        torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)), 10
    )
    small = ComposerClassifier(torch.nn.Linear(64, 10), 10)
    big.train()
    small.eval()
    result = measure_speedup(big, small, torch.randn(256, 64), repeats=5)
    assert result['speedup'] > 1.0
    assert result['speedup'] == pytest.approx(result['teacher_us_per_example'] / result['student_us_per_example'])
    assert big.training and not small.training  # each model's mode is given back


def test_the_printed_speedup_is_the_median_of_the_seeds_ratios_beside_the_median_times():
    """What docs/demo.md says of the line: with several seeds, the speed-up is the median of each seed's ratio, and
    the two times the medians of each model's times, whose ratio can differ from it."""
    from composer_kd.cli.demo import _inference_facts

    speeds = [
        {'teacher_us_per_example': 60.0, 'student_us_per_example': 0.2, 'speedup': 300.0},
        {'teacher_us_per_example': 80.0, 'student_us_per_example': 0.16, 'speedup': 500.0},
        {'teacher_us_per_example': 70.0, 'student_us_per_example': 0.175, 'speedup': 400.0},
    ]
    facts = _inference_facts(speeds, batch_size=540, repeats=30)
    assert facts['speedup'] == 400.0  # the median of 300, 500 and 400
    assert (facts['teacher_us_per_example'], facts['student_us_per_example']) == (70.0, 0.175)
    assert facts['speedup_per_seed'] == [300.0, 500.0, 400.0]
    # Here the two coincide (70 / 0.175 = 400); shift one seed's times and only the times' ratio moves.
    speeds[0].update(teacher_us_per_example=75.0, student_us_per_example=0.25)
    shifted = _inference_facts(speeds, batch_size=540, repeats=30)
    assert shifted['speedup'] == 400.0
    # Medians 75 (of 75, 80, 70) and 0.175 (of 0.25, 0.16, 0.175): 428.6, beside a printed 400.0x.
    assert shifted['teacher_us_per_example'] / shifted['student_us_per_example'] == pytest.approx(75.0 / 0.175)
