"""Two processes under Composer's launcher (gloo on CPU) train the same student as one process."""

from __future__ import annotations

import sys

import torch
from conftest import EXAMPLES, run_script

SCRIPT = EXAMPLES / 'multiprocess_distillation.py'


def run(processes: int, output_dir) -> dict:
    run_script(SCRIPT, '--output-dir', str(output_dir), processes=processes)
    return torch.load(output_dir / 'student.pt')


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single, double = run(1, tmp_path / 'one'), run(2, tmp_path / 'two')
    assert (single['world_size'], double['world_size']) == (1, 2)
    for name, value in single['weights'].items():
        # Only the order of floating-point reductions differs.
        torch.testing.assert_close(double['weights'][name], value, rtol=0, atol=1e-5)
    # And training did move the student away from where it started.
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from multiprocess_distillation import build_models
    finally:
        sys.path.remove(str(SCRIPT.parent))
    _, initial = build_models()
    assert not torch.allclose(initial.state_dict()['module.weight'], single['weights']['module.weight'])
