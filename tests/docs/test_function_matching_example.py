"""The function-matching example: a tiny run trains every student it compares, and the grid's choice is the best
on validation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_example


@pytest.fixture(scope='module')
def example():
    return load_example('function_matching')


def test_tiny_run(example, tmp_path):
    threads = torch.get_num_threads()
    try:
        report = example.main(['--tiny', '--output-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    (run,) = report['runs']
    assert run['seed'] == 0 and report['split'] == 'test'
    # One distilled student, its student alone with the same MixUp and budget, and one without MixUp.
    assert list(run['distilled']) == ['alpha=1.0 org=0.0 4ba']
    assert list(run['alone_mixup']) == ['alpha=1.0 org=- 4ba'] and list(run['alone_plain']) == ['4ba']
    for model in (run['teacher'], run['distilled']['alpha=1.0 org=0.0 4ba'], run['alone_mixup']['alpha=1.0 org=- 4ba']):
        assert set(model) == {'val', 'test'} and all(0.0 <= v <= 1.0 for v in model.values())
    (row,) = report['table']
    gain = run['distilled']['alpha=1.0 org=0.0 4ba']['test'] - run['alone_mixup']['alpha=1.0 org=- 4ba']['test']
    assert row['minus_alone']['mean'] == pytest.approx(100 * gain) and row['better'] == int(gain > 0)
    assert json.loads((tmp_path / 'tiny' / 'seed_0.json').read_text()) == run


def test_student_overrides_put_mixup_in_both_students_and_distil_only_one(example):
    setting = {'alpha': 0.2, 'org_loss_weight': 0.0, 'batches': 3000}
    distilled = example.student_overrides(10, setting, distilled=True)
    alone = example.student_overrides(10, setting, distilled=False)
    plain = example.student_overrides(10, setting, distilled=False, mixed=False)
    mixup = 'algorithms=[{name: MixUp, kwargs: {alpha: 0.2}}]'
    assert mixup in distilled and mixup in alone and mixup not in plain
    assert 'distillation.org_loss_weight=0.0' in distilled and 'distillation.enabled=false' in alone
    assert all('max_duration=3000ba' in o and 'seed=10' in o for o in (distilled, alone, plain))


def test_choice_is_the_best_mean_validation_accuracy(example):
    def run(seed, a, b):
        alone = {'val': 0.9, 'test': 0.9}
        return {
            'seed': seed,
            'teacher': {'val': 0.98, 'test': 0.98},
            'distilled': {'alpha=1.0 org=0.0 10ba': {'val': a, 'test': 0.5}, 'alpha=1.0 org=0.5 10ba': {'val': b}},
            'alone_mixup': {'alpha=1.0 org=- 10ba': alone},
            'alone_plain': {'10ba': alone},
        }

    runs = [run(0, 0.95, 0.94), run(1, 0.93, 0.95)]  # means 0.94 and 0.945
    assert example.choose(runs) == 'alpha=1.0 org=0.5 10ba'
    rows = example.table(runs, 'val')
    assert [r['better'] for r in rows] == [2, 2] and rows[0]['minus_alone']['mean'] == pytest.approx(4.0)
