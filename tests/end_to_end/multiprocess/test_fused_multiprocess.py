"""Fused distillation on two processes (gloo on CPU), under DDP and under Composer's FSDP version 2, trains as one
process does on the same global batch, and as the unfused path does; one launch of one process and one of two
processes run every case (see fused_ddp_worker.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'fused_ddp_worker.py'

#: The students each launch trains (see the worker); MPT where llm-foundry is installed.
STUDENTS = ['gpt2', 'gpt2_no_cache', 'gpt2_head', 'gpt2_head_micro', 'llama_head']
#: The two-process cases: DDP for the root-unit GPT-2, FSDP 2 for every student (teacher sharded), and FSDP 2 with
#: the teacher replicated for one head-unit student.
TWO_PROCESSES = ['gpt2:ddp', *(f'{student}:fsdp' for student in STUDENTS), 'gpt2_head:fsdp_replicated']


def llm_foundry() -> bool:
    return importlib.util.find_spec('llmfoundry') is not None


def run(processes: int, output: Path, cases: list[str]) -> dict:
    output.mkdir()
    run_script(WORKER, '--output', str(output), '--cases', ','.join(cases), processes=processes, timeout=600)
    return torch.load(output / 'results.pt')


@pytest.fixture(scope='module')
def results(tmp_path_factory) -> tuple[dict, dict]:
    students = STUDENTS + ['mpt'] * llm_foundry()
    two = TWO_PROCESSES + ['mpt:fsdp', 'mpt:ddp'] * llm_foundry()
    folder = tmp_path_factory.mktemp('fused_multiprocess')
    single = run(1, folder / 'one', [f'{student}:one' for student in students] + ['gpt2:unfused'])
    double = run(2, folder / 'two', two)
    assert (single['world_size'], double['world_size']) == (1, 2)
    return single, double


def assert_same(result: dict, reference: dict, case: str) -> None:
    # Only the order of floating-point reductions differs.
    for name, value in reference['weights'].items():
        torch.testing.assert_close(result['weights'][name], value, rtol=0, atol=1e-5, msg=f'{case}: {name}')
    torch.testing.assert_close(result['first_gradient'], reference['first_gradient'], rtol=0, atol=1e-6, msg=case)


def test_two_ddp_processes_train_as_one_and_as_the_unfused_path(results):
    single, double = results
    assert_same(double['gpt2:ddp'], single['gpt2:one'], 'gpt2:ddp')
    assert_same(single['gpt2:unfused'], single['gpt2:one'], 'gpt2:unfused')


@pytest.mark.parametrize('student', STUDENTS)
def test_two_fsdp2_processes_train_as_one(results, student):
    """The output layer in the root unit (with or without other outputs that start FSDP's backward pass) or in a
    unit of its own (gathered for the fused loss, its gradient reduce-scattered by FSDP, the teacher's likewise
    gathered), in one or two microbatches per batch: the gathered weights after three steps, and the first step's
    gradient of the output weight, are one process's."""
    single, double = results
    result = double[f'{student}:fsdp']
    assert_same(result, single[f'{student}:one'], f'{student}:fsdp')
    # FSDP released the output weight after the backward pass, as after an unfused step; and the sharded teacher's
    # output weight, gathered for the fused loss, was released after it.
    assert result['sharded_after_backward'] is True and result['teacher_released'] is True


def test_two_fsdp2_processes_with_the_teacher_replicated_train_as_one(results):
    single, double = results
    result = double['gpt2_head:fsdp_replicated']
    assert_same(result, single['gpt2_head:one'], 'gpt2_head:fsdp_replicated')
    assert result['sharded_after_backward'] is True and result['teacher_released'] is None  # the teacher is whole


def test_llm_foundry_mpt_under_fsdp2_and_ddp_trains_as_one(results):
    """llm-foundry's untied MPT, whose ``lm_head`` is an FSDP unit of its own (and an MPT teacher's too)."""
    if not llm_foundry():
        pytest.skip('llm-foundry is not installed')
    single, double = results
    for parallelism in ('fsdp', 'ddp'):
        assert_same(double[f'mpt:{parallelism}'], single['mpt:one'], f'mpt:{parallelism}')
    assert double['mpt:fsdp']['sharded_after_backward'] is True and double['mpt:fsdp']['teacher_released'] is True
