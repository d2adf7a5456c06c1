"""The modules of composer_kd.cache on their own: the storage table (in memory and on disk, top-k, bfloat16), the
fingerprint and its differences, the search for random augmentation, the index helpers, and a fit driven through
the FitCache protocol alone. Each result is checked against a computation written out here, mostly in numpy."""

from __future__ import annotations

import hashlib
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from composer import Event
from composer.algorithms import LabelSmoothing, MixUp
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from composer_kd.cache import CachedFit, IndexedDataset, StaleTeacherCacheError, TeacherCache, cache_fingerprint
from composer_kd.cache.augmentation import find_augmentation, refuse_augmentation
from composer_kd.cache.fingerprint import differences
from composer_kd.cache.fit import FitCache
from composer_kd.cache.indices import check_indices, read_index, unwrap_indexed
from composer_kd.cache.storage import (
    FORMAT_VERSION,
    STORAGE_DTYPES,
    all_gather_rows,
    create_disk_table,
    decode_logits,
    disk_table,
    encode_logits,
    memory_table,
    read_meta,
    table_layout,
    write_meta,
)

N_ROWS, POSITIONS, VOCAB, K = 6, 3, 10, 4


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest, ties to even), computed on the integer bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).view(np.int16)


def bfloat16_values(values: np.ndarray) -> np.ndarray:
    """The float32 values that bfloat16 holds for ``values``."""
    return (bfloat16_bits(values).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def numpy_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` largest logits per position (descending), their classes, and the logsumexp of the rest."""
    order = np.argsort(-logits, axis=-1, kind='stable')
    indices = order[..., :k]
    values = np.take_along_axis(logits, indices, axis=-1)
    rest = np.take_along_axis(logits, order[..., k:], axis=-1).astype(np.float64)
    tail = np.log(np.exp(rest).sum(axis=-1))
    return values, indices, tail


def distinct_logits(seed: int = 0) -> torch.Tensor:
    # Distinct values: the top-k is then unambiguous, whichever way ties would be broken.
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N_ROWS * POSITIONS * VOCAB, generator=generator)
    return perm.reshape(N_ROWS, POSITIONS, VOCAB).float() / 7.0 - 20.0


# ---- storage ---------------------------------------------------------------------------------------------------


def test_layout_names_each_array_with_its_shape_and_dtype():
    assert table_layout(N_ROWS, (POSITIONS, VOCAB), None, 'uniform', torch.float16) == {
        'values': ((N_ROWS, POSITIONS, VOCAB), torch.float16)
    }
    assert table_layout(N_ROWS, (VOCAB,), K, 'drop', torch.float32) == {
        'values': ((N_ROWS, K), torch.float32),
        'indices': ((N_ROWS, K), torch.int32),
    }
    assert set(STORAGE_DTYPES.values()) == {torch.float32, torch.float16, torch.bfloat16}


def test_encoding_top_k_in_bfloat16_keeps_rounded_values_their_classes_and_the_float32_tail():
    logits = distinct_logits()
    arrays = encode_logits(logits, K, 'uniform', torch.bfloat16)
    values, indices, tail = numpy_topk(logits.numpy(), K)
    assert arrays['values'].dtype == torch.bfloat16 and arrays['indices'].dtype == torch.int32
    np.testing.assert_array_equal(arrays['indices'].numpy(), indices)
    np.testing.assert_array_equal(arrays['values'].view(torch.int16).numpy(), bfloat16_bits(values))
    assert arrays['tail'].dtype == torch.float32
    np.testing.assert_allclose(arrays['tail'].numpy(), tail, rtol=1e-6)

    dense = decode_logits(arrays, K, VOCAB).numpy()
    expected = np.repeat((tail - math.log(VOCAB - K))[..., None], VOCAB, axis=-1).astype(np.float32)
    np.put_along_axis(expected, indices, bfloat16_values(values), axis=-1)
    np.testing.assert_allclose(dense, expected, rtol=1e-6)


def test_encoding_full_logits_out_of_float16_range_is_refused_with_the_largest_value():
    logits = torch.tensor([[1.0, 7.0e4]])
    with pytest.raises(ValueError, match=r'reach 7e\+04, beyond the range of the cache dtype float16'):
        encode_logits(logits, None, 'uniform', torch.float16)
    assert encode_logits(logits, None, 'uniform', torch.float32)['values'] is logits  # stored as given


@pytest.mark.parametrize('where', ['memory', 'disk'])
def test_a_table_round_trips_top_k_bfloat16_rows(where, tmp_path):
    logits = distinct_logits(seed=1)
    layout = table_layout(N_ROWS, (POSITIONS, VOCAB), K, 'uniform', torch.bfloat16)
    table = memory_table(layout) if where == 'memory' else disk_table(str(tmp_path), layout, create=True)
    rows = torch.tensor([4, 1, 2])
    table.write(rows, encode_logits(logits[rows], K, 'uniform', torch.bfloat16))
    table.flush()
    assert table.filled.tolist() == [False, True, True, False, True, False]

    if where == 'disk':  # the files on their own: bfloat16 bits as int16, classes as int32, one .npy per array
        values, indices, tail = numpy_topk(logits.numpy()[[4, 1, 2]], K)
        on_disk = {name: np.load(tmp_path / f'{name}.npy') for name in ('values', 'indices', 'tail', 'filled')}
        assert on_disk['values'].dtype == np.int16 and on_disk['indices'].dtype == np.int32
        np.testing.assert_array_equal(on_disk['values'][[4, 1, 2]], bfloat16_bits(values))
        np.testing.assert_array_equal(on_disk['indices'][[4, 1, 2]], indices)
        np.testing.assert_allclose(on_disk['tail'][[4, 1, 2]], tail, rtol=1e-6)
        np.testing.assert_array_equal(on_disk['filled'], [False, True, True, False, True, False])
        table = disk_table(str(tmp_path), layout, create=False)  # and opened again

    read = table.read(torch.tensor([2, 4]))
    expected = encode_logits(logits[[2, 4]], K, 'uniform', torch.bfloat16)
    assert read.keys() == expected.keys()
    for name in expected:
        assert read[name].dtype == expected[name].dtype
        torch.testing.assert_close(read[name], expected[name], rtol=0, atol=0)


def test_a_file_of_another_shape_is_refused_as_stale(tmp_path):
    disk_table(str(tmp_path), {'values': ((4, 3), torch.float32)}, create=True)
    expected = re.escape(f'file {str(tmp_path / "values.npy")!r} holds float32(4, 3), expected float32(5, 3)')
    with pytest.raises(StaleTeacherCacheError, match=expected):
        disk_table(str(tmp_path), {'values': ((5, 3), torch.float32)}, create=False)


def test_meta_is_written_after_the_files_and_read_back(tmp_path):
    folder = str(tmp_path / 'cache')
    meta = {'fingerprint': {'top_k': None}, 'row_shape': [3], 'n_rows': 2}
    table = create_disk_table(folder, {'values': ((2, 3), torch.float16)}, meta)
    assert read_meta(folder) == meta
    with open(tmp_path / 'cache' / 'meta.json') as f:
        assert json.load(f) == meta
    assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == ['filled.npy', 'meta.json', 'values.npy']
    assert table.arrays['values'].shape == (2, 3) and not table.filled.any()
    write_meta(folder, {'n_rows': 5})
    assert read_meta(folder) == {'n_rows': 5}
    assert read_meta(str(tmp_path)) is None


def test_gathering_rows_in_one_process_marks_the_shared_rows_and_keeps_their_values():
    table = memory_table({'values': ((5, 2), torch.float32)})
    table.arrays['values'][:] = torch.arange(10.0).reshape(5, 2)
    all_gather_rows(table, torch.tensor([3, 0]), lambda t: t, counts=[2])
    assert table.filled.tolist() == [True, False, False, True, False]
    torch.testing.assert_close(table.arrays['values'], torch.arange(10.0).reshape(5, 2))


@pytest.mark.parametrize(
    ('chunk_bytes', 'shapes'),
    [(40, [(2, 2, 2), (2, 2, 2), (1, 2, 2)]), (32, [(2, 2, 2), (2, 2, 2), (1, 2, 2)]), (8, [(1, 2, 2)] * 5)],
    ids=['two-rows-and-a-half', 'two-rows-exactly', 'row-larger-than-the-chunk'],
)
def test_rows_are_gathered_in_chunks_of_at_most_the_chunk_size_or_one_row(monkeypatch, chunk_bytes, shapes):
    """Each row here is 2 x 2 float32 (16 bytes): a chunk holds floor(chunk / 16) rows, and at least one."""
    from composer.utils import dist

    from composer_kd.cache import storage

    sent = []
    monkeypatch.setattr(storage, '_EXCHANGE_CHUNK_BYTES', chunk_bytes)
    monkeypatch.setattr(storage.dist, 'all_gather', lambda t, group=None: sent.append(t) or dist.get_world_size() * [t])
    table = memory_table({'values': ((6, 2, 2), torch.float32)})
    table.arrays['values'][:] = torch.arange(24.0).reshape(6, 2, 2)
    all_gather_rows(table, torch.tensor([5, 1, 0, 4, 2]), lambda t: t, counts=[5])
    values = [t for t in sent if t.dtype == torch.float32]
    assert [tuple(t.shape) for t in values] == shapes
    assert all(t.nbytes <= max(chunk_bytes, 16) for t in values)
    # The chunks carry the rows in the order given, and only those are marked shared.
    assert torch.cat([t for t in sent if t.dtype == torch.int64]).tolist() == [5, 1, 0, 4, 2]
    assert table.filled.tolist() == [True, True, True, False, True, True]


# ---- fingerprint ---------------------------------------------------------------------------------------------


def blake2_of_state_dict(module: nn.Module) -> str:
    """The teacher hash: class name, then by name each tensor's name, dtype, flattened shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(f'{tensor.dtype}{(tensor.numel(),)}'.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_fingerprint_fields_and_the_teacher_hash():
    torch.manual_seed(0)
    teacher = nn.Linear(3, 2)
    data = IndexedDataset([torch.zeros(3), torch.ones(3)])
    fingerprint = cache_fingerprint([teacher], data, top_k=2, tail='drop', dtype=torch.bfloat16, input_key=0)
    assert fingerprint['teachers'] == [f'Linear:{blake2_of_state_dict(teacher)}']
    assert {k: v for k, v in fingerprint.items() if k not in ('teachers', 'dataset_examples')} == {
        'format': FORMAT_VERSION,
        'dataset_length': 2,
        'top_k': 2,
        'tail': 'drop',
        'dtype': 'bfloat16',
        'precision': 'fp32',
        'teacher_dtype': None,
        'input_key': '0',
        'logits_key': None,
    }
    # The IndexedDataset is looked through: its examples are the wrapped dataset's.
    assert fingerprint == cache_fingerprint(
        [teacher], unwrap_indexed(data), top_k=2, tail='drop', dtype=torch.bfloat16, input_key=0
    )


def test_the_fingerprint_reads_sixteen_evenly_spaced_examples():
    n = 40
    picked = set(np.round(np.linspace(0, n - 1, 16)).astype(int).tolist())
    assert len(picked) == 16
    data = [torch.full((2,), float(i)) for i in range(n)]
    teacher = nn.Linear(2, 2)
    base = cache_fingerprint([teacher], data)['dataset_examples']
    for i in range(n):
        changed = list(data)
        changed[i] = changed[i] + 0.5
        differs = cache_fingerprint([teacher], changed)['dataset_examples'] != base
        assert differs == (i in picked), i


def test_differences_name_each_changed_field_with_both_values():
    teacher, data = nn.Linear(3, 2), [torch.zeros(3)]
    full = cache_fingerprint([teacher], data)
    topk = cache_fingerprint([teacher], data, top_k=4, tail='uniform', dtype=torch.bfloat16)
    assert differences(full, topk) == [
        "dtype: recorded 'float32', now 'bfloat16'",
        "tail: recorded None, now 'uniform'",
        'top_k: recorded None, now 4',
    ]
    assert differences(full, full) == []
    older = {k: v for k, v in full.items() if k != 'format'}
    assert differences(older, full) == [f'format: recorded None, now {FORMAT_VERSION}']

    with torch.no_grad():
        teacher.bias.add_(1.0)
    (line,) = differences(full, cache_fingerprint([teacher], data))
    assert line == f'teachers: recorded {full["teachers"]!r}, now {[f"Linear:{blake2_of_state_dict(teacher)}"]!r}'


def test_a_cache_bound_to_one_fingerprint_refuses_another_naming_the_differences():
    cache = TeacherCache()
    cache.bind({'top_k': None, 'dtype': 'float32'}, n_rows=3)
    message = "holds outputs recorded for another teacher or data (dtype: recorded 'float32', now 'float16')"
    with pytest.raises(StaleTeacherCacheError, match=re.escape(message)):
        cache.bind({'top_k': None, 'dtype': 'float16'}, n_rows=3)


# ---- augmentation ---------------------------------------------------------------------------------------------


class Images(list):
    """A dataset with a ``transform``, as torchvision's are."""

    def __init__(self, transform, n: int = 4):
        super().__init__(range(n))
        self.transform = transform


def test_a_random_crop_inside_a_compose_is_found_with_its_path():
    data = Images(T.Compose([T.ToTensor(), T.RandomCrop(4)]))
    assert find_augmentation(data) == 'RandomCrop (at train_dataloader.dataset.transform.transforms[1])'
    wrapped = IndexedDataset(Subset(data, [0, 1]))
    assert find_augmentation(wrapped) == (
        'RandomCrop (at train_dataloader.dataset.dataset.dataset.transform.transforms[1])'
    )
    concatenated = ConcatDataset([Images(T.ToTensor()), Images(nn.Sequential(T2.CenterCrop(3), T2.ColorJitter(0.1)))])
    # nn.Sequential holds no 'transforms': its children are searched by name.
    assert find_augmentation(concatenated) == 'ColorJitter (at train_dataloader.dataset.datasets[1].transform.1)'


def test_deterministic_transforms_and_target_only_algorithms_are_not_augmentation():
    assert find_augmentation(Images(T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,)), T.CenterCrop(3)]))) is None
    assert find_augmentation([1, 2], algorithms=[LabelSmoothing(0.1)]) is None
    assert find_augmentation([1, 2], algorithms=[LabelSmoothing(0.1), MixUp()]) == (
        'Composer algorithm MixUp (it changes the batch before the forward pass)'
    )


def test_refusing_augmentation_names_the_source_and_the_way_out():
    refuse_augmentation(Images(T.ToTensor()))
    with pytest.raises(ValueError, match=r'data: RandomCrop \(at .*\)\. .*TeacherCache\(allow_augmentation=True\)'):
        refuse_augmentation(Images(T.Compose([T.RandomCrop(4)])))


# ---- indices -------------------------------------------------------------------------------------------------


def test_indices_are_read_flattened_and_checked_against_the_dataset_length():
    batch = {'x': torch.zeros(3, 2), 'id': torch.tensor([[5], [0], [2]], dtype=torch.int32)}
    rows = check_indices(read_index(batch, 'id'), n_rows=6)
    assert rows.dtype == torch.int64 and rows.tolist() == [5, 0, 2]
    assert read_index((torch.zeros(2), torch.tensor([1, 3])), 1).tolist() == [1, 3]
    with pytest.raises(IndexError, match='Example index 6 is outside the training dataset of 6 examples'):
        check_indices(torch.tensor([0, 6]), n_rows=6)
    with pytest.raises(IndexError, match='Example index -1 is outside'):
        check_indices(torch.tensor([-1, 2]), n_rows=6)
    assert check_indices(torch.zeros(0, dtype=torch.long), n_rows=0).tolist() == []


# ---- the fit, through the protocol alone ----------------------------------------------------------------------


class DictCache:
    """A FitCache that is not a TeacherCache: recorded logits in a dict, calls counted."""

    def __init__(self, index_key=None):
        self.index_key = index_key
        self.stored: dict[int, torch.Tensor] = {}
        self.calls: list[str] = []

    def lookup(self, rows, device='cpu'):
        if not all(int(r) in self.stored for r in rows):
            return None
        return torch.stack([self.stored[int(r)] for r in rows]).to(device)

    def record(self, rows, logits):
        self.stored.update({int(r): logit for r, logit in zip(rows, logits, strict=True)})

    def exchange(self, to_device=lambda t: t):
        self.calls.append('exchange')

    def flush(self):
        self.calls.append('flush')


def test_a_fit_needs_only_what_the_protocol_lists():
    cache = DictCache(index_key='id')
    fit = CachedFit(cache, dataset_key=None)
    state = SimpleNamespace(batch={'x': torch.zeros(2, 3), 'id': torch.tensor([4, 2])}, device=SimpleNamespace())
    state.device.tensor_to_device = lambda t: t
    logits, rows = fit.lookup(state, 2, 'cpu')
    assert logits is None and rows.tolist() == [4, 2]
    fit.record(rows, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    logits, _ = fit.lookup(state, 2, 'cpu')
    torch.testing.assert_close(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    fit.on_event(Event.EPOCH_END, state)
    fit.on_event(Event.FIT_END, state)
    assert cache.calls == ['exchange', 'flush']
    # What the protocol lists, and TeacherCache provides.
    members = {name for name in vars(FitCache) if not name.startswith('_')} | set(FitCache.__annotations__)
    assert members == {'index_key', 'lookup', 'record', 'exchange', 'flush'}
    assert all(hasattr(TeacherCache(), name) for name in members)
