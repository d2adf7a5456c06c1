"""On-policy distillation on two processes (gloo on CPU): each rank generates continuations of its own shard's
prompts, with the unwrapped student, and the student trains as one process does with the same global batch, greedy or
sampling; a student sharded by FSDP is refused before any step."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'onpolicy_ddp_worker.py'


def run(processes: int, output: Path) -> tuple[dict, list[list[list[int]]]]:
    output.mkdir()
    run_script(WORKER, '--output', str(output), processes=processes)
    prompts = [torch.load(output / f'rank{rank}.pt')['prompts'] for rank in range(processes)]
    return torch.load(output / 'results.pt'), prompts


def test_each_rank_generates_for_its_shard_and_trains_as_one_process(tmp_path):
    single, single_prompts = run(1, tmp_path / 'one')
    double, double_prompts = run(2, tmp_path / 'two')
    assert (single['world_size'], double['world_size']) == (1, 2)
    # 3 batches: one process generated for 8 prompts a batch, each of two for its own 4.
    assert len(single_prompts[0]) == 24 and [len(p) for p in double_prompts] == [12, 12]
    assert sorted(double_prompts[0] + double_prompts[1]) == sorted(single_prompts[0])
    assert not set(map(tuple, double_prompts[0])) & set(map(tuple, double_prompts[1]))
    for key in ('weights', 'sampled_weights'):  # greedy decoding, then sampling at temperature 1
        for name, value in single[key].items():
            # Only the order of floating-point reductions differs.
            torch.testing.assert_close(double[key][name], value, rtol=0, atol=1e-5, msg=f'{key}: {name}')
    moved = [
        name for name, value in single['sampled_weights'].items() if not torch.equal(value, single['weights'][name])
    ]
    assert moved  # sampling trained on other sequences than greedy decoding
    # The same fit with the student sharded by FSDP (version 2) is refused when it starts, before any step.
    assert single['fsdp_error'] is None
    error = double['fsdp_error']
    assert (error['type'], error['batches']) == ('ValueError', 0)
    assert 'On-policy distillation does not support FSDP' in error['message']
