"""Feature distillation with a learned projection on two processes (gloo on CPU) trains the student and the
projection as one process does with the same global batch: at every step, once the window has closed, and when
teacher sampling skips the pair's teacher."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'features_ddp_worker.py'
sys.path.insert(0, str(WORKER.parent))

from features_ddp_worker import CASES  # noqa: E402


def run(processes: int, output: Path) -> dict:
    output.mkdir()
    run_script(WORKER, '--output', str(output), processes=processes)
    return torch.load(output / 'results.pt')


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp('features_ddp')
    single, double = run(1, folder / 'one'), run(2, folder / 'two')
    assert (single['world_size'], double['world_size']) == (1, 2)
    return single, double


@pytest.mark.parametrize('case', sorted(CASES))
def test_two_processes_train_student_and_projection_as_one(runs, case):
    single, double = runs
    assert 'projection.0.weight' in single[case]
    for name, value in single[case].items():
        # Only the order of floating-point reductions differs.
        torch.testing.assert_close(double[case][name], value, rtol=0, atol=1e-5, msg=f'{case}: {name}')
