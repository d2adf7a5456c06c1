"""TeacherCache on two processes (gloo on CPU): after epoch 1 no process runs the teacher, though the sampler
hands each one other examples than it recorded, and the student matches a run without a cache."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'cache_ddp_worker.py'


def test_two_processes_share_what_they_recorded(tmp_path):
    run_script(WORKER, '--output', str(tmp_path), processes=2)
    results = torch.load(tmp_path / 'results.pt')
    assert results['world_size'] == 2
    # 48 examples, 2 processes, 4 batches of 6 each per epoch; with a cache the teacher runs in epoch 1 only.
    assert results['plain']['calls_per_epoch'] == [[4, 4], [4, 4]]
    for name in ('memory', 'disk'):
        assert results[name]['calls_per_epoch'] == [[4, 0], [4, 0]], name
        assert results[name]['recorded'] == 48
        for key, value in results['plain']['weights'].items():
            torch.testing.assert_close(results[name]['weights'][key], value, rtol=0, atol=1e-6)
