"""Teachers sharded like an FSDP student, on two processes (gloo on CPU, FSDP version 2): each rank holds half of
the teacher's parameters between forward passes, the teacher's logits are the unsharded teacher's, the student trains
as one process without FSDP trains it, the user's teacher comes back unchanged, and a teacher built on the meta
device on rank 1 takes rank 0's weights; ``TeacherInference(shard=False)`` keeps a whole teacher on every rank. A
teacher cache and a stored teacher signal under FSDP train the student as one process does too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'sharded_teacher_worker.py'
CASES = ('mlp', 'gpt2', 'gpt2_meta', 'replica', 'foundry')  # a teacher runs, and its shards are recorded


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict[int, tuple[dict, list[dict]]]:
    results = {}
    for processes in (1, 2):
        output = tmp_path_factory.mktemp(f'sharded{processes}')
        run_script(WORKER, '--output', str(output), processes=processes)
        records = [torch.load(output / f'rank{rank}.pt') for rank in range(processes)]
        results[processes] = (torch.load(output / 'results.pt'), records)
    return results


@pytest.mark.parametrize('case', [*CASES, 'cache', 'signal'])
def test_student_trains_as_one_process_does(runs, case):
    (single, _), (double, _) = runs[1], runs[2]
    assert (single['world_size'], double['world_size']) == (1, 2)
    for name, value in single[case].items():
        # Only the order of floating-point reductions differs.
        torch.testing.assert_close(double[case][name], value, rtol=0, atol=1e-5, msg=f'{case}: {name}')


@pytest.mark.parametrize('case', ['mlp', 'gpt2', 'gpt2_meta', 'foundry'])
def test_each_rank_holds_half_of_the_teacher_between_forward_passes(runs, case):
    _, records = runs[2]
    for rank, record in enumerate(records):
        full, padding = record[case]['full_bytes'], record[case]['padding_bound']
        # After every batch, and right after a forward pass of its own, the root's parameters included (tied
        # embeddings counted once).
        for held in record[case]['held']:
            assert full / 2 - padding <= held <= full / 2 + padding, f'rank {rank} holds {held} of {full} bytes'
    # One process, no FSDP: the whole teacher.
    single = runs[1][1][0][case]
    assert set(single['held']) == {single['full_bytes']}


def test_a_whole_teacher_on_every_rank_when_asked(runs):
    for record in runs[2][1]:
        assert set(record['replica']['held']) == {record['replica']['full_bytes']}


@pytest.mark.parametrize('case', CASES)
def test_logits_equal_the_unsharded_teachers_and_the_teacher_is_given_back(runs, case):
    for processes in (1, 2):
        for rank, record in enumerate(runs[processes][1]):
            assert record[case]['teacher_unchanged'], f'{processes} processes, rank {rank}'
            if case in ('gpt2_meta', 'foundry') and rank == 1 and processes == 2:
                assert record[case]['logits_difference'] is None  # its own teacher holds no weights to compare
                continue
            assert record[case]['logits_difference'] <= 1e-5, f'{processes} processes, rank {rank}'
