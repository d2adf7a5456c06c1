"""The teacher-signal benchmark's figures for choosing k: the kept mass at each k is the teacher's own top-k
probability, every student of a seed (from the signal at each k, from the live teacher, alone) starts from the same
weights and sees the same token batches, and the run stops when they do not."""

from __future__ import annotations

import statistics

import pytest
import torch

import benchmarks.teacher_signal as bench

SETTINGS = {**bench.QUICK, 'ks': (4, 16), 'train_k': 16, 'seeds': (0, 1)}


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
    """The report of a tiny run, and the teacher and held-out tokens it used."""
    seen = {}
    train_teacher, sequences = bench.train_teacher, bench.sequences

    def keep_teacher(*args):
        seen['teacher'] = train_teacher(*args)
        return seen['teacher']

    def keep_sequences(*args):
        seen['train'], seen['held_out'], vocab = sequences(*args)
        return seen['train'], seen['held_out'], vocab

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bench.train_teacher, bench.sequences = keep_teacher, keep_sequences
    try:
        report = bench.run(SETTINGS, str(tmp_path_factory.mktemp('signal')))
    finally:
        bench.train_teacher, bench.sequences = train_teacher, sequences
        torch.set_num_threads(threads)
    return report, seen


def test_the_kept_mass_is_the_teachers_top_k_probability(measured):
    report, seen = measured
    with torch.no_grad():
        probabilities = torch.softmax(seen['teacher'](seen['held_out']).logits.double(), dim=-1)
    for k in SETTINGS['ks']:
        expected = float(probabilities.topk(k, dim=-1).values.sum(-1).mean())
        assert report['per_k'][str(k)]['kept_mass_held_out'] == pytest.approx(expected, rel=1e-4)
        assert 0 < report['per_k'][str(k)]['kept_mass_train'] < 1
    assert report['per_k']['4']['kept_mass_train'] < report['per_k']['16']['kept_mass_train']


def test_every_student_of_a_seed_is_paired_and_the_table_follows_from_the_perplexities(measured):
    report, _ = measured
    students = ['k=4', 'k=16', 'live', 'alone']
    assert [entry['students'] for entry in report['pairing']] == [students, students]
    assert [entry['batches'] for entry in report['pairing']] == [SETTINGS['student_steps']] * 2
    assert report['pairing'][0]['weights'] != report['pairing'][1]['weights']
    alone = report['student_perplexity']['alone']['values']
    for k in ('4', '16'):
        row = report['students_per_k'][k]
        values = row['perplexity']['values']
        assert len(values) == 2 and row['perplexity']['std'] == pytest.approx(statistics.stdev(values))
        assert row['ratio_to_alone'] == pytest.approx(statistics.mean(values) / statistics.mean(alone))
        assert row['minus_alone']['values'] == pytest.approx([v - a for v, a in zip(values, alone, strict=True)])
    assert report['student_perplexity']['shards'] == report['students_per_k']['16']['perplexity']
    table = bench.markdown(report)
    assert '| k | kept mass, training signal | held-out perplexity' in table
    assert '| live teacher | - |' in table and '| alone | - |' in table


def test_the_run_stops_when_a_student_starts_elsewhere(monkeypatch, tmp_path):
    calls = []
    gpt2 = bench.gpt2

    def drifting(vocab, width, layers, seed, length):
        calls.append(seed)  # every student gets another seed: none starts where the one before did
        return gpt2(vocab, width, layers, seed + len(calls), length)

    monkeypatch.setattr(bench, 'gpt2', drifting)
    with pytest.raises(AssertionError, match="'timed from shards' did not start from the weights"):
        bench.run({**SETTINGS, 'ks': (4,), 'train_k': 4, 'seeds': (0,)}, str(tmp_path))
