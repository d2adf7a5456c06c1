"""Fused distillation on two processes (gloo on CPU) trains as one process does on the same global batch, and as
the unfused path does."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'fused_ddp_worker.py'


def run(processes: int, output: Path, *flags: str) -> dict:
    output.mkdir()
    run_script(WORKER, '--output', str(output), *flags, processes=processes)
    return torch.load(output / 'results.pt')


def test_two_processes_train_as_one_and_as_the_unfused_path(tmp_path):
    single = run(1, tmp_path / 'one')
    double = run(2, tmp_path / 'two')
    unfused = run(1, tmp_path / 'unfused', '--unfused')
    assert (single['world_size'], double['world_size']) == (1, 2)
    for name, value in single['weights'].items():
        # Only the order of floating-point reductions differs.
        torch.testing.assert_close(double['weights'][name], value, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(unfused['weights'][name], value, rtol=0, atol=1e-5, msg=name)
