"""TeacherCache on two processes (gloo on CPU), all from one launch of ``cache_ddp_worker.py``: after epoch 1 no
process runs the teacher, though the sampler hands each one other examples than it recorded, and the student
matches a run without a cache; in-memory rows are shared in all_gathers no larger than the chunk, and every process
ends with the rows a one-process cache records; checkpoints at an epoch end, and folder caches, resume exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_script
from torch.utils.data import DataLoader

from composer_kd import IndexedDataset, TeacherCache

WORKER = Path(__file__).resolve().parent / 'cache_ddp_worker.py'
sys.path.insert(0, str(WORKER.parent))

from cache_ddp_worker import CHUNK_BYTES, make_data, make_teacher  # noqa: E402


@pytest.fixture(scope='module')
def results(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp('cache_ddp')
    run_script(WORKER, '--output', str(output), processes=2)
    results = torch.load(output / 'results.pt')
    assert results['world_size'] == 2
    return results


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=atol, msg=key)


def test_two_processes_share_what_they_recorded(results):
    # 48 examples, 2 processes, 4 batches of 6 each per epoch; with a cache the teacher runs in epoch 1 only.
    assert results['plain']['calls_per_epoch'] == [[4, 4], [4, 4]]
    for name in ('memory', 'disk'):
        assert results[name]['calls_per_epoch'] == [[4, 0], [4, 0]], name
        assert results[name]['recorded'] == 48
        # The cache only replaces teacher calls; the tolerance covers nothing but DDP's gradient averaging order.
        assert_same_weights(results['plain']['weights'], results[name]['weights'], atol=1e-6)


def test_rows_are_shared_in_chunks_and_equal_a_one_process_cache(results):
    # Each process recorded 24 rows of 16 bytes in epoch 1; chunks of 80 bytes hold 5: 5 all_gathers of the row
    # numbers (int64) and 5 of the values, each at most the chunk. Epoch 2 recorded nothing, so nothing moved.
    gathered = results['memory']['gathered']
    values = [g for g in gathered if g['dtype'] == 'torch.float32']
    assert [g['shape'] for g in values] == [(5, 4)] * 4 + [(4, 4)]
    assert all(g['bytes'] <= CHUNK_BYTES for g in values)
    assert [g['shape'] for g in gathered if g['dtype'] == 'torch.int64'] == [(5,)] * 4 + [(4,)]
    # Every process holds all 48 rows, bitwise the same: each row was recorded by one process and copied.
    tables = results['memory']['tables']
    assert all(bool(table['filled'].all()) for table in tables)
    assert torch.equal(tables[0]['values'], tables[1]['values'])
    # And they are the rows one process records for the same teacher and data.
    data = IndexedDataset(make_data())
    single = TeacherCache().precompute(make_teacher(), DataLoader(data, batch_size=6), device='cpu')
    expected = single.lookup(torch.arange(48))
    # Within 1e-6 rather than bitwise: the teacher ran on batches of other examples in the two runs.
    torch.testing.assert_close(tables[0]['values'], expected, rtol=0, atol=1e-6)


def test_a_checkpoint_at_an_epoch_end_resumes_exactly(results):
    # The in-memory cache saved at the end of epoch 1 holds every process's rows: epoch 2 runs no teacher anywhere.
    run = results['memory_epoch_end']
    assert run['calls_per_epoch'] == [[0, 0], [0, 0]]
    assert run['recorded'] == 48
    assert_same_weights(results['memory']['weights'], run['weights'])


def test_a_folder_cache_resumes_exactly_from_the_middle_of_an_epoch(results):
    # Stopped after 2 of epoch 1's 4 batches: each process runs the teacher for its 2 remaining ones, then never.
    run = results['disk_mid_epoch']
    assert run['calls_per_epoch'] == [[2, 0], [2, 0]]
    assert run['recorded'] == 48
    assert_same_weights(results['disk']['weights'], run['weights'])


def test_an_in_memory_cache_saved_mid_epoch_records_the_other_rows_again(results):
    # The checkpoint held rank zero's 12 rows of epoch 1; rank one's first 12 are recorded again in epoch 2.
    run = results['memory_mid_epoch']
    calls = run['calls_per_epoch']
    assert [rank[0] for rank in calls] == [2, 2] and sum(rank[1] for rank in calls) > 0
    assert run['recorded'] == 48
    # Those rows come from the teacher run on other batches than in the uninterrupted run: equal to 1e-6.
    assert_same_weights(results['memory']['weights'], run['weights'], atol=1e-6)
