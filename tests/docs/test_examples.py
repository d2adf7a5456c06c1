"""The runnable examples: their data are what they claim, and each runs end to end in seconds and really distils."""

from __future__ import annotations

import math
import subprocess
import sys
from types import ModuleType

import pytest
import torch
from conftest import EXAMPLES, load_example

# A few optimizer steps per stage: enough to exercise every stage, the metrics and the logged loss terms.
TINY_VISION = '--teacher-epochs 1 --student-epochs 1 --max-train-samples 64 --max-eval-samples 64'.split()
TINY_NLP = '--teacher-epochs 1 --student-epochs 1 --train-samples 64 --eval-samples 32'.split()
COMMON = '--batch-size 32 --device cpu --seed 0 --baseline'.split()


@pytest.fixture(scope='module')
def vision() -> ModuleType:
    return load_example('vision_distillation')


@pytest.fixture(scope='module')
def nlp() -> ModuleType:
    return load_example('nlp_distillation')


def check_results(results: dict, train_samples: int) -> None:
    """Accuracies are fractions, the student is smaller, and the student's loss held a real distillation term."""
    for key in ('teacher_accuracy', 'student_accuracy', 'baseline_student_accuracy'):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    assert 0 < results['student_params'] < results['teacher_params']
    assert results['train_samples'] == train_samples
    kd, original, total = results['final_kd_loss'], results['final_original_loss'], results['final_train_loss']
    # 'loss/train/kd' is only logged when Distillation ran the teacher; KL between two different models is > 0.
    assert math.isfinite(kd) and kd > 0, kd
    # The loss the student was trained on is the weighted sum of both terms (weights 0.5 and 0.5 by default).
    assert total == pytest.approx(0.5 * original + 0.5 * kd, rel=1e-5)


def test_vision_digits_are_a_fixed_offline_split(vision):
    train, test = vision.split_digits()
    images, labels = train.tensors
    assert images.shape == (1347, 3, 32, 32) and len(test) == 450
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert set(labels.tolist()) == set(range(10))
    again, _ = vision.split_digits()
    assert torch.equal(again.tensors[1], labels)


def test_vision_example_runs_tiny_and_distils(vision, capsys, one_thread):
    results = vision.main(TINY_VISION + COMMON)
    check_results(results, train_samples=64)
    assert results['test_samples'] == 64
    assert 'teacher  ResNet-18' in capsys.readouterr().out


def test_nlp_data_is_padded_and_labelled_by_token_order(nlp):
    dataset = nlp.OrderDataset(64, seed=0)
    batch = nlp.pad_batch([dataset[i] for i in range(16)])
    assert set(batch) == {'input_ids', 'attention_mask', 'token_type_ids', 'labels'}
    lengths = batch['attention_mask'].sum(dim=1)
    assert len(set(lengths.tolist())) > 1, 'rows should have different lengths'
    assert (batch['input_ids'][batch['attention_mask'] == 0] == nlp.PAD).all()
    for ids, label in zip(batch['input_ids'], batch['labels'], strict=True):
        ids = ids.tolist()
        assert label == int(ids.index(nlp.TOKEN_A) < ids.index(nlp.TOKEN_B))
    labels = torch.stack([dataset[i]['labels'] for i in range(len(dataset))])
    assert 0 < labels.sum() < len(labels), 'both classes should occur'
    assert torch.equal(nlp.OrderDataset(64, seed=0)[5]['input_ids'], dataset[5]['input_ids'])


def test_nlp_example_runs_tiny_and_distils(nlp, capsys, one_thread):
    results = nlp.main(TINY_NLP + COMMON)
    check_results(results, train_samples=64)
    assert results['eval_samples'] == 32
    assert 'teacher  BERT' in capsys.readouterr().out


@pytest.mark.parametrize('name', ['vision_distillation', 'nlp_distillation'])
def test_examples_run_as_scripts(name):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f'{name}.py'), '--help'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert '--student-epochs' in result.stdout and '--seed' in result.stdout


TINY_COMPRESSION = (
    '--seeds 0 1 --teacher-epochs 1 --student-batches 6 --finetune-batches 3 --qat-lrs 0.003 0.03 --finetune-lrs 0.01 '
    '--sparsities 0.5 --structured-sparsities 0.25 --latency-repeats 5 --latency-widths 32'
).split()


def test_compression_example_prints_both_tables(capsys, tmp_path, nondeterministic_algorithms_allowed):
    compression = load_example('compression_distillation')
    results = compression.main([*TINY_COMPRESSION, '--json', str(tmp_path / 'results.json')])
    out = capsys.readouterr().out
    assert 'Quantization-aware distillation (x86 engine), digits test split, mean ± std over 2 seeds [0, 1]' in out
    assert 'Pruning with distillation: fp32 distilled student pruned once, fine-tuned 3 batches' in out
    qat_table, pruning_table = results['tables']['qat'].splitlines(), results['tables']['pruning'].splitlines()
    assert qat_table[0].split()[:3] == ['student', 'test', 'accuracy'] and len(qat_table) == 2 + 5
    assert [line.split('  ')[0] for line in pruning_table[2:]] == [
        'dense (distilled fp32)',
        '50% of hidden-layer weights',
        '25% of hidden units',
    ]
    for table in (qat_table, pruning_table):
        assert '\n'.join(table) in out
    # The QAT learning rate is the one with the best mean validation accuracy.
    by_lr = results['qat']['val_by_lr']
    assert results['qat']['lr'] == float(max(by_lr, key=lambda lr: by_lr[lr]['mean']))
    for stats in (results['qat']['int8']['test'], results['fp32']['alone']['test'], results['fp32']['ptq']['val']):
        assert len(stats['per_seed']) == 2 and all(0 <= v <= 1 for v in stats['per_seed'])
    assert results['size_bytes']['int8'] < results['size_bytes']['fp32']
    assert all(v['ratio'] > 0 for v in results['latency_seconds'].values())
    # Sparsity of every weight: half of the first layer's 64 x 32, a quarter of its 32 rows; none of the 32 x 10.
    unstructured, structured = results['pruning']
    assert unstructured['sparsity_of_all_weights'] == pytest.approx(1024 / 2368)
    assert structured['sparsity_of_all_weights'] == pytest.approx(8 * 64 / 2368)
    assert len(structured['with_distillation']['test']['per_seed']) == 2
    assert (tmp_path / 'results.json').is_file()
