"""The fully labelled digits comparison: a tiny run reports every model, and its choice is the best on validation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_example


@pytest.fixture(scope='module')
def example():
    return load_example('digits_full_labels')


def test_tiny_run(example, tmp_path):
    threads = torch.get_num_threads()
    try:
        report = example.main(['--tiny', '--output-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    (run,) = report['runs']
    assert report['seeds'] == [0] and 'data.digits.per_class=null' in example.FULL_LABELS
    for row in example.ROWS:
        for split in ('val', 'test'):
            assert 0.0 <= run[row][split] <= 1.0
    # One candidate per loss in the tiny grid (T 4, kd weight 1), the best on validation chosen.
    candidates = run['search']['candidates']
    assert [c['candidate'] for c in candidates] == [
        'kl, T=4, kd weight 1, label weight 1',
        'dkd(beta=0.5), T=4, kd weight 1, label weight 1',
        'kl(standardize=True), T=4, kd weight 1, label weight 1',
    ]
    best = max(candidates, key=lambda c: c['val'])  # max keeps the first of equals, as the search does
    assert run['search']['chosen'] == best['candidate']
    summary = report['summary']
    gain = run['dkd_paper']['test'] - run['alone']['test']
    assert summary['dkd_paper']['minus_alone']['mean'] == pytest.approx(gain)
    assert summary['dkd_paper']['seeds_better'] == int(gain > 0)
    assert json.loads((tmp_path / 'report.json').read_text())['runs'][0]['search'] == run['search']
    table = example.format_report(report)
    assert all(f'| {row} |' in table for row in example.ROWS)


def test_every_student_of_a_seed_starts_from_the_same_weights_and_batches(example):
    from composer_kd.recipes import build_run, load_recipe
    from composer_kd.recipes.trainers import build_student_alone

    base = [*example.FULL_LABELS, 'seed=5', 'max_duration=2ba', 'teachers.0.train.max_duration=1ba']
    first = build_run(load_recipe('digits', [*base, 'baseline=true']))
    alone, alone_trainer = build_student_alone(first.recipe, first.data)
    overrides = next(iter(v for k, v in example.VARIANTS.items() if k != 'hinton_kd'))
    other = build_run(load_recipe('digits', [*base, 'baseline=false', *overrides]), teachers=first.teachers)
    reference = first.student.state_dict()
    for student in (alone, other.student):  # the student alone, and a distilled variant built later
        assert reference.keys() == student.state_dict().keys()
        assert all(torch.equal(reference[k], v) for k, v in student.state_dict().items())

    def first_batches(trainer):
        loader = trainer.state.train_dataloader
        return [batch for _, batch in zip(range(2), loader, strict=False)]

    for trainer in (alone_trainer, other.trainer):
        for ours, theirs in zip(first_batches(first.trainer), first_batches(trainer), strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
