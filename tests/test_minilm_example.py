"""The MiniLM example: the teacher is the packaged model, and a tiny run reports what it measured, consistently."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[1] / 'examples' / 'minilm_distillation.py'


@pytest.fixture(scope='module')
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location('composer_kd_example_minilm', EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny_reports(example, tmp_path_factory) -> tuple[dict, dict, Path]:
    """Two tiny runs into one folder: the second must reuse the teacher the first fine-tuned."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp('minilm')
    try:
        first = example.main(['--tiny', '--output-dir', str(out), '--device', 'cpu'])
        second = example.main(['--tiny', '--output-dir', str(out), '--device', 'cpu'])
    finally:
        torch.set_num_threads(threads)
    return first, second, out


def test_teacher_is_the_packaged_minilm(example):
    package_weights = load_file(str(example.minilm_dir() / 'model.safetensors'))
    teacher = example.load_teacher(num_labels=5, seed=0)
    weights = teacher.state_dict()
    # The file stores the bare BertModel; the classifier nests it under `bert.` and adds a new 5-way head.
    loaded = {key: value for key, value in package_weights.items() if key != 'embeddings.position_ids'}
    assert len(loaded) == 103  # embeddings 5, six blocks of 16, pooler 2
    for key, value in loaded.items():
        assert torch.equal(weights[f'bert.{key}'], value), key
    assert set(weights) - {f'bert.{key}' for key in loaded} == {'classifier.weight', 'classifier.bias'}
    assert weights['classifier.weight'].shape == (5, 384)
    config = teacher.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (6, 384, 30522)


def test_tokenizer_is_the_packaged_vocabulary(example):
    vocabulary = (example.minilm_dir() / 'vocab.txt').read_text(encoding='utf-8').split('\n')
    ids = example.load_tokenizer()('Rovers reject bid')['input_ids']
    assert ids[0] == vocabulary.index('[CLS]') and ids[-1] == vocabulary.index('[SEP]')
    # Uncased WordPiece: whole words in the vocabulary map to their line number.
    assert ids[1:-1] == [vocabulary.index(word) for word in ('rovers', 'reject', 'bid')]


def test_tiny_run_reports_consistent_numbers(tiny_reports):
    report, _, out = tiny_reports
    assert set(report) >= {'settings', 'data', 'per_seed', 'summary', 'table'}
    assert report['data']['sizes'] == {'train': 32, 'val': 16, 'test': 16}
    assert report['data']['labels'] == ['business', 'entertainment', 'politics', 'sports', 'tech']
    assert report['settings']['student_layers'] == [0, 3]
    (run,) = report['per_seed']
    accuracy = run['accuracy']
    for role in ('teacher', 'student_alone', 'student_distilled'):
        for split in ('val', 'test'):
            # Accuracies over 16 examples are multiples of 1/16.
            assert (accuracy[role][split] * 16) == pytest.approx(round(accuracy[role][split] * 16)), (role, split)
            assert 0.0 <= accuracy[role][split] <= 1.0
    # Two of six blocks kept: the student lacks four blocks of 4 * 384 * 384 + 2 * 384 * 1536 weights, their
    # biases (4 * 384 + 1536 + 384) and their two layer norms (4 * 384).
    block = 4 * 384 * 384 + 2 * 384 * 1536 + 4 * 384 + 1536 + 384 + 4 * 384
    assert run['parameters']['teacher'] == 22_715_141
    assert run['parameters']['teacher'] - run['parameters']['student'] == 4 * block
    speed = run['speed']
    assert speed['speedup'] == pytest.approx(speed['teacher_ms'] / speed['student_ms'])
    teacher, alone, distilled = (accuracy[role]['test'] for role in ('teacher', 'student_alone', 'student_distilled'))
    if teacher != alone:
        assert run['distillation_ratio'] == pytest.approx((distilled - alone) / (teacher - alone))
    else:
        assert math.isnan(run['distillation_ratio'])
    summary = report['summary']
    assert summary['accuracy']['teacher']['test']['mean'] == pytest.approx(teacher)
    assert summary['distilled_minus_alone'] == pytest.approx(distilled - alone)
    assert 'student distilled: layers 0, 3' in report['table']
    on_disk = json.loads((out / 'report.json').read_text())
    assert on_disk['per_seed'][0]['accuracy'] == accuracy


def test_second_run_reuses_the_cached_teacher(tiny_reports):
    first, second, out = tiny_reports
    assert first['per_seed'][0]['teacher_cached'] is False
    assert second['per_seed'][0]['teacher_cached'] is True
    assert len(list((out / 'teachers').glob('teacher-seed0-*.pt'))) == 1
    # The same teacher, and students trained from it with the same seed, score the same.
    assert second['per_seed'][0]['accuracy'] == first['per_seed'][0]['accuracy']


def test_summary_is_mean_and_sample_std(example):
    runs = [
        {
            'accuracy': {
                'teacher': {'val': t, 'test': t},
                'student_alone': {'val': a, 'test': a},
                'student_distilled': {'val': d, 'test': d},
            },
            'distillation_ratio': (d - a) / (t - a),
            'speed': {'speedup': s, 'teacher_ms': 2.0 * s, 'student_ms': 2.0},
        }
        for t, a, d, s in ((0.9, 0.8, 0.85, 2.0), (0.92, 0.78, 0.88, 3.0))
    ]
    summary = example.summarize(runs)
    assert summary['accuracy']['student_distilled']['test']['mean'] == pytest.approx(0.865)
    assert summary['accuracy']['student_distilled']['test']['std'] == pytest.approx(0.03 / math.sqrt(2))
    assert summary['distilled_minus_alone'] == pytest.approx(0.865 - 0.79)
    assert summary['distillation_ratio_of_means'] == pytest.approx((0.865 - 0.79) / (0.91 - 0.79))
    assert summary['distillation_ratio']['mean'] == pytest.approx((0.5 + 10 / 14) / 2)
    assert summary['distilled_better_on'] == 2
    assert summary['speedup']['mean'] == pytest.approx(2.5)


def test_bad_kd_weight_is_refused(example):
    with pytest.raises(SystemExit):
        example.parse_args(['--kd-weight', '1.5'])
