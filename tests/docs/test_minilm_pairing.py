"""The MiniLM example's students of a seed (alone and distilled, at every setting, in one run or a later one that
reuses the cached teacher) start from the same weights and see the same batches; and the check that says so fails
when they do not.

The example runs as written, with one change: ``load_teacher`` builds a tiny BERT from a config (4 blocks, 8 wide)
instead of loading the packaged MiniLM, so the test takes seconds and reads nothing but the installed tokenizer and
corpus.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from composer import Trainer
from conftest import load_example
from transformers import BertConfig, BertForSequenceClassification

from benchmarks.pairing import PairingRecord, check_pairing, digest

TINY = ['--tiny', '--device', 'cpu', '--student-epochs', '2', '--student-lrs', '1e-4', '3e-4']


@pytest.fixture
def example(monkeypatch) -> ModuleType:
    module = load_example('minilm_distillation')

    def tiny_teacher(num_labels: int, seed: int) -> BertForSequenceClassification:
        # As load_teacher: seeded, then built; the vocabulary is the packaged tokenizer's.
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=30522, hidden_size=8, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, num_labels=num_labels,
        )  # fmt: skip
        return BertForSequenceClassification(config)

    monkeypatch.setattr(module, 'load_teacher', tiny_teacher)
    return module


@pytest.fixture
def students(example, monkeypatch) -> list[tuple[int, str, PairingRecord]]:
    """Every student trainer the example builds, as (seed, 'alone' or 'distilled', its record), in order."""
    built: list[tuple[int, str, PairingRecord]] = []

    class RecordingTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            model = kwargs.get('model')
            # The students keep 2 of the teacher's 4 blocks; the teachers' trainers are not recorded.
            if kwargs.get('train_dataloader') is not None and model.model.config.num_hidden_layers == 2:
                kind = 'distilled' if kwargs.get('algorithms') else 'alone'
                built.append((kwargs['seed'], kind, PairingRecord()))
                kwargs['callbacks'] = [built[-1][2]]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(example, 'Trainer', RecordingTrainer)
    return built


@pytest.mark.usefixtures('one_thread')
def test_every_student_of_a_seed_starts_from_the_same_weights_and_sees_the_same_batches(example, students, tmp_path):
    example.main([*TINY, '--seeds', '0', '1', '--output-dir', str(tmp_path)])
    # Per seed: alone at 2 learning rates, then distilled at 2 learning rates x 2 weights.
    assert [(seed, kind) for seed, kind, _ in students] == [
        (seed, kind) for seed in (0, 1) for kind in ['alone'] * 2 + ['distilled'] * 4
    ]
    common = {}
    for seed in (0, 1):
        records = {f'{i}: {kind}': record for i, (s, kind, record) in enumerate(students) if s == seed}
        common[seed] = check_pairing(records)
        # 32 training headlines in batches of 8, 2 epochs.
        assert common[seed]['batches'] == 8
    # The seeds differ from one another, in the weights and the batches: the check can tell them apart.
    assert common[0]['weights'] != common[1]['weights']
    assert common[0]['batch_order'] != common[1]['batch_order']
    # The second epoch's batches are not the first's again: each epoch is shuffled anew.
    first = next(record for seed, _, record in students if seed == 0)
    assert first.batches[:4] != first.batches[4:]


@pytest.mark.usefixtures('one_thread')
def test_a_student_trained_later_from_the_cached_teacher_starts_where_the_others_did(example, students, tmp_path):
    out = ['--output-dir', str(tmp_path), '--seeds', '0']
    example.main([*TINY, '--student-lrs', '1e-4', *out])
    # A wider grid: only the new setting is trained, from the teacher read back from the cache.
    report = example.main([*TINY, '--student-lrs', '1e-4', '--kd-weights', '0.5', '0.9', '0.7', *out])
    assert report['runs'][0]['teacher_cached'] is True and report['runs'][0]['results_computed'] == 1
    assert [kind for _, kind, _ in students] == ['alone', 'distilled', 'distilled', 'distilled']
    check_pairing({f'{i}: {kind}': record for i, (_, kind, record) in enumerate(students)})


def test_the_check_names_the_fit_that_differs():
    def record(weights: torch.Tensor, *batches: torch.Tensor) -> PairingRecord:
        made = PairingRecord()
        made.weights = digest({'w': weights})
        made.batches = [digest({'x': batch}) for batch in batches]
        return made

    a, b = torch.arange(4.0), torch.arange(4.0) + 1
    same = check_pairing({'alone': record(a, a, b), 'distilled': record(a.clone(), a.clone(), b.clone())})
    assert same['batches'] == 2
    with pytest.raises(AssertionError, match="'distilled' did not start from the weights 'alone' started from"):
        check_pairing({'alone': record(a, a, b), 'distilled': record(b, a, b)})
    with pytest.raises(AssertionError, match="batch 1 of 'distilled' differs from batch 1 of 'alone'"):
        check_pairing({'alone': record(a, a, b), 'distilled': record(a, a, a)})
    with pytest.raises(AssertionError, match="'distilled' saw 1 batches, 'alone' saw 2"):
        check_pairing({'alone': record(a, a, b), 'distilled': record(a, a)})
    # The same values in another dtype are other weights.
    with pytest.raises(AssertionError, match='did not start from the weights'):
        check_pairing({'alone': record(a, a), 'distilled': record(a.double(), a)})
    with pytest.raises(ValueError, match='saw no fit or no batch'):
        check_pairing({'alone': record(a, a), 'distilled': PairingRecord()})
    with pytest.raises(KeyError, match=r"keys \['labels'\] are not in the batch"):
        digest({'input_ids': a}, keys=['labels'])
