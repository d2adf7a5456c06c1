"""On-policy distillation on two processes (gloo on CPU): each rank generates continuations of its own shard's
prompts, with the unwrapped student under DDP and with the generating model's parameters gathered under FSDP
(version 2), and the student trains as one process does with the same global batch, greedy, sampling or on the
teacher's continuations; a teacher sharded by ``fully_shard`` generates what it generates unsharded, with no
collective call, the ranks stopping at different lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'onpolicy_ddp_worker.py'
CASES = ('greedy', 'sampled', 'teacher_greedy')


def run(processes: int, output: Path) -> tuple[dict, list[dict]]:
    output.mkdir()
    run_script(WORKER, '--output', str(output), processes=processes)
    ranks = [torch.load(output / f'rank{rank}.pt') for rank in range(processes)]
    return torch.load(output / 'results.pt'), ranks


@pytest.fixture(scope='module')
def launches(tmp_path_factory) -> dict:
    """One launch of one process and one of two, shared by the tests."""
    folder = tmp_path_factory.mktemp('onpolicy')
    (single, (alone,)), (double, ranks) = run(1, folder / 'one'), run(2, folder / 'two')
    return {'single': single, 'alone': alone, 'double': double, 'ranks': ranks}


def assert_same_weights(actual: dict, expected: dict, case: str) -> None:
    assert actual.keys() == expected.keys(), case
    for name, value in expected.items():
        # Only the order of floating-point reductions differs.
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-5, msg=f'{case}: {name}')


def test_each_rank_generates_for_its_shard_and_trains_as_one_process(launches):
    single, alone, double, ranks = (launches[key] for key in ('single', 'alone', 'double', 'ranks'))
    assert (single['world_size'], double['world_size']) == (1, 2)
    for case in CASES:
        # 3 batches: one process generated for 8 prompts a batch, each of two for its own 4, under DDP and FSDP.
        single_prompts = alone[case]['prompts']
        assert len(single_prompts) == 24, case
        for kind in (case, f'fsdp_{case}'):
            double_prompts = [own[kind]['prompts'] for own in ranks]
            assert [len(p) for p in double_prompts] == [12, 12], kind
            assert sorted(double_prompts[0] + double_prompts[1]) == sorted(single_prompts), kind
            assert not set(map(tuple, double_prompts[0])) & set(map(tuple, double_prompts[1])), kind
        # Under DDP and under FSDP (version 2) two processes train as one.
        assert_same_weights(double[case], single[case], f'DDP {case}')
        assert_same_weights(double[f'fsdp_{case}'], single[case], f'FSDP {case}')
        # Generation made no collective call: under FSDP every unit's parameters stayed gathered between forward
        # passes, and the ranks were not kept in step. The model that generated was FSDP's own (the student, or the
        # teacher's sharded copy), its parameters gathered.
        assert [own[case]['collectives'] for own in [alone, *ranks]] == [0, 0, 0], case
        assert [own[f'fsdp_{case}']['collectives'] for own in ranks] == [0, 0], case
        assert all(own[case]['models'] == {(False, True)} for own in [alone, *ranks]), case
        assert all(own[f'fsdp_{case}']['models'] == {(True, True)} for own in ranks), case
    # Each case trained on other sequences than the others.
    for first, second in (('greedy', 'sampled'), ('greedy', 'teacher_greedy')):
        assert any(not torch.equal(value, single[second][name]) for name, value in single[first].items())


def test_a_sharded_teacher_generates_as_unsharded_each_rank_stopping_when_its_rows_end(launches):
    teachers = [own['sharded_teacher'] for own in launches['ranks']]
    for rank, teacher in enumerate(teachers):
        for temperature in (0.0, 1.0):
            assert teacher[f'generated_{temperature}'] == teacher[f'expected_{temperature}'], (rank, temperature)
            # No collective call, and the model that generated held its full parameters (its root, outside it,
            # gathered too).
            assert teacher[f'collectives_{temperature}'] == 0
            assert teacher[f'models_{temperature}'] == {(False, True)}
        # Left as found: every parameter sharded again, the blocks resharding after forward and the root not, no
        # forward recorded for the backward's prefetching, and the sharded forward pass unchanged.
        assert teacher['all_sharded_after'] and teacher['reshard_after_forward'] == [True, True, False]
        assert teacher['forward_records'] == 0 and teacher['forward_error'] < 1e-6
    # Greedy: rank 0's continuation ended after its first token, rank 1's ran to max_new_tokens, each rank running
    # one forward pass per token it generated (not kept in step with the other).
    assert [len(teacher['generated_0.0'][0]) for teacher in teachers] == [1, 6]
    assert [teacher['forward_passes_0.0'] for teacher in teachers] == [1, 6]
