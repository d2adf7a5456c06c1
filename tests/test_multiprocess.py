"""Two processes under Composer's launcher (gloo on CPU) train the same student as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'examples' / 'multiprocess_distillation.py'
LAUNCHER = Path(sys.executable).with_name('composer')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(command: list[str], output_dir: Path) -> dict:
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(
        [*command, str(SCRIPT), '--output-dir', str(output_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(output_dir / 'student.pt')


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single = run([sys.executable], tmp_path / 'one')
    double = run([str(LAUNCHER), '-n', '2', '--master_port', str(free_port())], tmp_path / 'two')
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
