"""A teacher signal written by two processes (gloo on CPU) and read by two: the same files, byte for byte, as one
process writes (also from a teacher sharded across the two), a cut part index rewritten on resume by the rank that
owns the part, disjoint samples per process that together cover the dataset, and a fit resumed mid-epoch that sees
the same batches and losses. One launch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import run_script

WORKER = Path(__file__).resolve().parent / 'signal_ddp_worker.py'


def _files(root: Path) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(folder, name), root): Path(folder, name).read_bytes()
        for folder, _, names in os.walk(root)
        for name in names
    }


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
    output = tmp_path_factory.mktemp('signal-ddp')
    run_script(WORKER, '--output', str(output), processes=2)
    return output, torch.load(output / 'results.pt', weights_only=False)


def test_two_ranks_write_the_signal_one_process_writes(launched):
    output, results = launched
    assert results['world_size'] == 2
    two, one = _files(output / 'signal'), _files(output / 'alone')
    assert {'index.json', 'teacher_signal.json', 'part-00003/index.json', 'part-00003/signal_part.json'} <= set(two)
    assert sorted(two) == sorted(one)
    for name, content in one.items():
        assert two[name] == content, name
    settings = json.loads(two['teacher_signal.json'])
    assert settings['teacher']['weights'].startswith('GPT2LMHeadModel:')  # the same weights wrote both
    assert set(settings['kept_mass']['parts']) == {f'part-0000{p}' for p in range(4)}
    for rank in results['ranks']:  # every rank reports the whole write
        first = rank['first']
        assert (first.parts_written, first.parts_skipped, first.positions) == (4, 0, 16 * 8)
        assert first.kept_mass == pytest.approx(settings['kept_mass']['mean'])


def test_a_teacher_sharded_across_the_writing_ranks_writes_the_same_signal(launched):
    output, results = launched
    sharded, one = _files(output / 'sharded'), _files(output / 'alone')
    assert sorted(sharded) == sorted(one)
    for name, content in one.items():
        assert sharded[name] == content, name  # the sharded teacher's fingerprint is the whole teacher's too
    for rank in results['ranks']:
        assert (rank['sharded'].parts_written, rank['sharded'].parts_skipped) == (4, 0)
        assert (rank['sharded_resumed'].parts_written, rank['sharded_resumed'].parts_skipped) == (1, 3)


def test_a_cut_part_index_is_rewritten_by_its_rank_on_resume(launched):
    _, results = launched
    for rank in results['ranks']:
        assert (rank['resumed'].parts_written, rank['resumed'].parts_skipped) == (1, 3)
    assert [len(rank['reported']) for rank in results['ranks']] == [0, 1]
    assert 'part-00003' in results['ranks'][1]['reported'][0]


def test_two_processes_read_disjoint_samples(launched):
    _, results = launched
    first, second = ({t for batch in rank['first_tokens'] for t in batch} for rank in results['ranks'])
    assert not first & second
    assert first | second == set(range(16))
    assert all(len(rank['kd']) == 4 and all(math.isfinite(v) for v in rank['kd']) for rank in results['ranks'])


def test_a_fit_resumed_mid_epoch_sees_the_same_batches_and_losses(launched):
    _, results = launched
    for rank in results['ranks']:
        assert rank['resumed_first_tokens'] == rank['first_tokens']
        assert rank['resumed_kd'] == pytest.approx(rank['kd'], rel=1e-5)
