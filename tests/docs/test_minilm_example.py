"""The MiniLM example: the teacher is the packaged model, and a tiny run reports what it measured, consistently."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import EXAMPLES, load_example
from safetensors.torch import load_file

EXAMPLE = EXAMPLES / 'minilm_distillation.py'


@pytest.fixture(scope='module')
def example() -> ModuleType:
    return load_example('minilm_distillation')


@pytest.fixture(scope='module')
def tiny_reports(example, tmp_path_factory) -> tuple[dict, dict, dict, Path]:
    """Three tiny runs into one folder.

    Before the second, the saved results are deleted, so it must retrain every student from the first's cached
    teacher; the third must only read the results the second saved.
    """
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp('minilm')
    argv = ['--tiny', '--output-dir', str(out), '--device', 'cpu']
    try:
        first = example.main(argv)
        shutil.rmtree(out / 'runs')
        second = example.main(argv)
        third = example.main(argv)
    finally:
        torch.set_num_threads(threads)
    return first, second, third, out


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
    report, _, _, out = tiny_reports
    assert set(report) >= {'settings', 'data', 'selection', 'per_seed', 'summary', 'runs', 'table'}
    assert report['data']['sizes'] == {'train': 32, 'val': 16, 'test': 16}
    assert report['data']['labels'] == ['business', 'entertainment', 'politics', 'sports', 'tech']
    assert report['settings']['student_layers'] == [0, 3]
    (run,) = report['runs']
    assert set(run['alone']) == {'lr=0.0001'}
    assert set(run['distilled']) == {'lr=0.0001 T=2 w=0.5', 'lr=0.0001 T=2 w=0.9'}
    scores = [run['teacher'], *run['alone'].values(), *run['distilled'].values()]
    for score in scores:
        for split in ('val', 'test'):
            # Accuracies over 16 examples are multiples of 1/16.
            assert score[split] * 16 == pytest.approx(round(score[split] * 16))
            assert 0.0 <= score[split] <= 1.0
    # The distilled setting is the one with the best validation accuracy, the first of equals.
    by_val = max(run['distilled'], key=lambda key: run['distilled'][key]['val'])
    assert report['selection']['distilled'] == by_val
    (chosen,) = report['per_seed']
    accuracy = chosen['accuracy']
    assert accuracy['student_distilled'] == run['distilled'][by_val]
    assert accuracy['student_alone'] == run['alone']['lr=0.0001']
    # Two of six blocks kept: the student lacks four blocks of 4 * 384 * 384 + 2 * 384 * 1536 weights, their
    # biases (4 * 384 + 1536 + 384) and their two layer norms (4 * 384).
    block = 4 * 384 * 384 + 2 * 384 * 1536 + 4 * 384 + 1536 + 384 + 4 * 384
    assert run['parameters']['teacher'] == 22_715_141
    assert run['parameters']['teacher'] - run['parameters']['student'] == 4 * block
    speed = run['speed']
    assert speed['speedup'] == pytest.approx(speed['teacher_ms'] / speed['student_ms'])
    assert speed['batch_shape'][0] == 8
    teacher, alone, distilled = (accuracy[role]['test'] for role in ('teacher', 'student_alone', 'student_distilled'))
    if teacher != alone:
        assert chosen['distillation_ratio'] == pytest.approx((distilled - alone) / (teacher - alone))
    else:
        assert chosen['distillation_ratio'] is None
    summary = report['summary']
    assert summary['accuracy']['teacher']['test']['mean'] == pytest.approx(teacher)
    assert summary['distilled_minus_alone'] == pytest.approx(distilled - alone)
    assert f'student distilled: layers 0, 3, {by_val}' in report['table']
    on_disk = json.loads((out / 'report.json').read_text())
    assert on_disk['per_seed'][0]['accuracy'] == accuracy


def test_later_runs_reuse_the_teacher_and_the_results(tiny_reports):
    first, second, third, out = tiny_reports
    # Teacher accuracy, one student alone, two distilled, the timing: five results.
    assert (first['runs'][0]['teacher_cached'], first['runs'][0]['results_computed']) == (False, 5)
    assert (second['runs'][0]['teacher_cached'], second['runs'][0]['results_computed']) == (True, 5)
    assert (third['runs'][0]['teacher_cached'], third['runs'][0]['results_read']) == (None, 5)
    assert len(list((out / 'teachers').glob('teacher-seed0-*.pt'))) == 1
    assert len(list((out / 'runs' / 'seed0').glob('*.json'))) == 5
    # The same teacher, and students retrained from it with the same seed, score the same.
    for kind in ('teacher', 'alone', 'distilled'):
        assert second['runs'][0][kind] == first['runs'][0][kind]
    assert third['per_seed'] == second['per_seed']


def test_selection_uses_validation_only(example):
    runs = [
        {
            'seed': seed,
            'teacher': {'val': 0.9, 'test': 0.9},
            'alone': {'lr=1': {'val': 0.5, 'test': 0.9}, 'lr=2': {'val': 0.6, 'test': 0.1}},
            'distilled': {'a': {'val': v_a, 'test': 0.1}, 'b': {'val': v_b, 'test': 0.9}},
            'speed': {'speedup': 2.0, 'teacher_ms': 2.0, 'student_ms': 1.0},
        }
        for seed, v_a, v_b in ((0, 0.7, 0.6), (1, 0.7, 0.8))
    ]
    selection = example.select_on_validation(runs)
    assert selection['alone'] == 'lr=2'
    assert selection['distilled'] == 'a'  # mean val 0.7 ties with b; the first tried wins
    assert selection['val_means']['distilled'] == {'a': pytest.approx(0.7), 'b': pytest.approx(0.7)}
    chosen = example.chosen_accuracies(runs[0], selection)
    assert chosen['accuracy']['student_alone']['test'] == 0.1
    assert chosen['distillation_ratio'] == pytest.approx((0.1 - 0.1) / (0.9 - 0.1))


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
    assert summary['distillation_ratio']['undefined_on'] == 0
    # A seed whose student alone equals its teacher has no ratio; the others still average.
    runs[1]['distillation_ratio'] = None
    summary = example.summarize(runs)
    assert summary['distillation_ratio']['mean'] == pytest.approx(0.5)
    assert summary['distillation_ratio']['undefined_on'] == 1
    assert 'undefined on 1 seed(s)' in example.ratio_text(summary)


def test_bad_kd_weight_is_refused(example, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(['--kd-weights', '0.5', '1.5'])
    assert '--kd-weights must lie in [0, 1], got [1.5]' in capsys.readouterr().err


def test_other_losses_are_keyed_apart_and_reported_each(example, tiny_reports, tmp_path):
    out = tmp_path / 'minilm'
    shutil.copytree(tiny_reports[-1], out)  # the cached teacher and results, left as the other tests find them
    assert example.distilled_key(3e-4, 1.0, 0.5) == 'lr=0.0003 T=1 w=0.5'  # the KL's keys, as before
    assert example.distilled_key(3e-4, 4.0, 0.5, 'dkd', 0.5) == 'dkd(beta=0.5) lr=0.0003 T=4 w=0.5'
    assert example.loss_of('kl_std lr=0.0003 T=1 w=0.5') == 'kl_std'
    loss = example.kd_loss('kl_std', 2.0)
    assert loss.temperature == 2.0 and type(loss.loss).__name__ == 'KLDivergence'
    threads = torch.get_num_threads()
    try:
        argv = ['--tiny', '--output-dir', str(out), '--device', 'cpu', '--kd-weights', '0.5']
        report = example.main([*argv, '--losses', 'kl', 'dkd', 'kl_std', '--dkd-beta', '0.5'])
    finally:
        torch.set_num_threads(threads)
    (run,) = report['runs']
    assert set(run['distilled']) == {
        'lr=0.0001 T=2 w=0.5',
        'dkd(beta=0.5) lr=0.0001 T=2 w=0.5',
        'kl_std lr=0.0001 T=2 w=0.5',
    }
    assert run['teacher_cached'] and run['results_computed'] == 2  # the KL's result and the teacher's were kept
    assert set(report['per_loss']) == {'kl', 'dkd', 'kl_std'}
    for loss, entry in report['per_loss'].items():
        assert example.loss_of(entry['setting']) == loss
        assert entry['test']['mean'] == run['distilled'][entry['setting']]['test']
    assert 'each loss at its best setting on validation' in report['table']
