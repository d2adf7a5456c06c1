"""Feature distillation with a learned projection on two processes (gloo on CPU) trains the student and the
projection as one process does with the same global batch: at every step, once the window has closed, and when
teacher sampling skips the pair's teacher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_multiprocess import LAUNCHER, free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / 'features_ddp_worker.py'
sys.path.insert(0, str(WORKER.parent))

from features_ddp_worker import CASES  # noqa: E402


def run(command: list[str], output: Path) -> dict:
    output.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(
        [*command, str(WORKER), '--output', str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(output / 'results.pt')


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp('features_ddp')
    single = run([sys.executable], folder / 'one')
    double = run([str(LAUNCHER), '-n', '2', '--master_port', str(free_port())], folder / 'two')
    assert (single['world_size'], double['world_size']) == (1, 2)
    return single, double


@pytest.mark.parametrize('case', sorted(CASES))
def test_two_processes_train_student_and_projection_as_one(runs, case):
    single, double = runs
    assert 'projection.0.weight' in single[case]
    for name, value in single[case].items():
        # Only the order of floating-point reductions differs.
        torch.testing.assert_close(double[case][name], value, rtol=0, atol=1e-5, msg=f'{case}: {name}')
