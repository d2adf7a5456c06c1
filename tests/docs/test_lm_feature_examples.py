"""The language-model and feature-distillation examples: real offline data, and a tiny run that really distils."""

from __future__ import annotations

import math

import pytest
from test_examples import load_example


@pytest.fixture(scope='module')
def lm():
    return load_example('lm_distillation')


@pytest.fixture(scope='module')
def features():
    return load_example('feature_distillation')


def test_lm_text_is_real_english_split_by_document(lm):
    documents = lm.load_documents()
    assert len(documents) >= 10 and set(lm.HELD_OUT) <= set(documents)
    assert 'Iris' in documents['iris.rst']
    train, held_out = lm.load_splits(max_length=64, max_train=None, max_eval=None)
    # Training sequences come from every other document, held-out ones from the held-out documents only.
    expected_train = [
        s for name in sorted(documents) if name not in lm.HELD_OUT for s in lm.split_into_sequences(documents[name], 64)
    ]
    assert train.sequences == expected_train
    assert held_out.sequences == [s for name in lm.HELD_OUT for s in lm.split_into_sequences(documents[name], 64)]
    # Sequences are UTF-8 bytes of the text, paragraph by paragraph.
    assert bytes(held_out.sequences[0]).decode('utf-8') in documents[lm.HELD_OUT[0]]
    assert all(8 <= len(s) <= 64 for s in train.sequences + held_out.sequences)
    assert all(0 <= byte < 256 for s in train.sequences for byte in s)


def test_lm_batches_mask_padding_in_labels(lm):
    batch = lm.pad_batch([[72, 105], [72, 101, 108, 108, 111]])
    assert batch['input_ids'].tolist() == [[72, 105, lm.PAD, lm.PAD, lm.PAD], [72, 101, 108, 108, 111]]
    assert batch['attention_mask'].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch['labels'].tolist() == [[72, 105, -100, -100, -100], [72, 101, 108, 108, 111]]


@pytest.mark.parametrize('student', ['llama', 'gpt2'])
def test_lm_example_runs_tiny_and_distils(lm, student, capsys, one_thread):
    argv = '--teacher-epochs 1 --student-epochs 1 --max-train-sequences 32 --max-eval-sequences 16 --max-length 64'
    argv += ' --org-loss-weight 0.3 --kd-loss-weight 0.7'
    results = lm.main([*argv.split(), '--student', student, '--baseline', '--device', 'cpu', '--seed', '0'])
    for key in ('teacher_cross_entropy', 'student_cross_entropy', 'baseline_student_cross_entropy'):
        # Cross-entropy per byte lies between 0 and that of a uniform guess over the vocabulary, log(257), give or
        # take what one epoch of training can make worse.
        assert 0 < results[key] < 2 * math.log(lm.VOCAB_SIZE), (key, results[key])
    assert 0 < results['student_params'] < results['teacher_params']
    kd, original, total = results['final_kd_loss'], results['final_original_loss'], results['final_train_loss']
    assert math.isfinite(kd) and kd > 0
    assert total == pytest.approx(0.3 * original + 0.7 * kd, rel=1e-5)
    assert ('Llama' if student == 'llama' else 'GPT-2') in capsys.readouterr().out


@pytest.mark.parametrize(('loss', 'projection'), [('mse', 16 * 64), ('attention_map', 0)])
def test_feature_example_runs_tiny_and_distils_features(features, loss, projection, one_thread):
    argv = '--teacher-epochs 1 --student-epochs 1 --max-train-samples 64 --max-eval-samples 64 --batch-size 32'
    results = features.main([*argv.split(), '--feature-loss', loss, '--baseline', '--device', 'cpu', '--seed', '0'])
    for key in ('teacher_accuracy', 'student_accuracy', 'baseline_student_accuracy'):
        assert 0.0 <= results[key] <= 1.0
    # A 1x1 projection from the student's 16 channels to the teacher's 64, only where the loss compares channels.
    assert results['projection_params'] == projection
    kd, feature = results['final_kd_loss'], results['final_feature_loss']
    original, total = results['final_original_loss'], results['final_train_loss']
    assert kd > 0 and feature > 0
    assert total == pytest.approx(0.5 * original + 0.5 * kd + 1.0 * feature, rel=1e-5)


def test_feature_models_name_the_paired_modules(features):
    teacher, student = features.build_teacher(), features.build_student()
    assert teacher.module.features.conv2.out_channels == 64
    assert student.module.features.conv2.out_channels == 16
    assert features.count_parameters(student) < features.count_parameters(teacher) / 10
