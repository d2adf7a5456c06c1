"""Teacher-signal shards read by two processes (gloo on CPU): disjoint samples that together cover the dataset,
each process distilling from the signal of what it read."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'signal_ddp_worker.py'


def test_two_processes_read_disjoint_samples(tmp_path):
    run_script(WORKER, '--output', str(tmp_path), processes=2)
    results = torch.load(tmp_path / 'results.pt')
    assert results['world_size'] == 2
    first, second = (set(rank['first_tokens']) for rank in results['ranks'])
    assert not first & second
    assert first | second == set(range(16))
    assert all(len(rank['kd']) == 4 and all(math.isfinite(v) for v in rank['kd']) for rank in results['ranks'])
