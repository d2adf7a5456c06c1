"""Feature distillation with a learned projection on two processes (gloo on CPU) trains the student and the
projection as one process does with the same global batch: at every step, once the window has closed, and when
teacher sampling skips the pair's teacher; with the student replicated by DDP and sharded by FSDP."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'features_parallel_worker.py'
sys.path.insert(0, str(WORKER.parent))

from features_parallel_worker import CASES  # noqa: E402


def run(output: Path, processes: int, *options: str) -> dict:
    output.mkdir()
    run_script(WORKER, '--output', str(output), *options, processes=processes)
    return torch.load(output / 'results.pt')


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp('features_parallel')
    results = {
        'one': run(folder / 'one', 1),
        'ddp': run(folder / 'ddp', 2),
        'fsdp': run(folder / 'fsdp', 2, '--fsdp'),
    }
    assert {name: result['world_size'] for name, result in results.items()} == {'one': 1, 'ddp': 2, 'fsdp': 2}
    return results


@pytest.mark.parametrize('parallelism', ['ddp', 'fsdp'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_two_processes_train_student_and_projection_as_one(runs, case, parallelism):
    single, double = runs['one'], runs[parallelism]
    assert 'projection.0.weight' in single[case]
    assert double[case].keys() == single[case].keys()
    for name, value in single[case].items():
        # Only the order of floating-point reductions differs.
        torch.testing.assert_close(double[case][name], value, rtol=0, atol=1e-5, msg=f'{case}: {name}')
