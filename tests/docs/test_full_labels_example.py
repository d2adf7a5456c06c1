"""The fully labelled digits comparison: a tiny run reports every model, and its choice is the best on validation."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import EXAMPLES

EXAMPLE = EXAMPLES / 'digits_full_labels.py'


@pytest.fixture(scope='module')
def example():
    spec = importlib.util.spec_from_file_location('composer_kd_example_full_labels', EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
