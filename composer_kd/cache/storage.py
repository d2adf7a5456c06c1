"""Where recorded teacher outputs live: one table row per training example, in memory or in ``.npy`` files.

A :class:`CacheTable` holds named arrays with one row per example (``values``; with top-k also ``indices`` and,
for the uniform tail, ``tail``; see :func:`table_layout`) and a boolean ``filled`` array marking the rows that hold
a recorded output. :func:`encode_logits` turns teacher logits into those arrays and :func:`decode_logits` turns
them back into logits. :func:`memory_table` keeps the arrays as CPU tensors; :func:`disk_table` memory-maps one
``.npy`` file per array in a folder, described by a ``meta.json`` (:func:`read_meta`, :func:`write_meta`) that
:func:`create_disk_table` writes once the files exist, also when several processes share the folder.
:func:`all_gather_rows` copies into every process's table the rows the others recorded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch
from composer.utils import dist

from composer_kd.cache.errors import StaleTeacherCacheError
from composer_kd.cache.topk import topk_compress, topk_logits

__all__ = [
    'FORMAT_VERSION',
    'STORAGE_DTYPES',
    'CacheTable',
    'Layout',
    'all_gather_rows',
    'create_disk_table',
    'decode_logits',
    'disk_table',
    'encode_logits',
    'memory_table',
    'read_meta',
    'table_layout',
    'write_meta',
]

#: The version of the files' layout, part of every fingerprint. Bumped whenever the layout changes, so that an
#: older cache is refused rather than misread.
FORMAT_VERSION = 1

#: The dtypes a cache may store logits in, by name.
STORAGE_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}

#: Each array of a table by name: its shape (rows first) and dtype.
Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]

# The most bytes one all_gather moves when processes share what they recorded.
_EXCHANGE_CHUNK_BYTES = 64 * 2**20
# numpy has no bfloat16: its bits are kept as int16 on disk and viewed back as bfloat16.
_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}
_META_FILE = 'meta.json'
_LOCK_FILE = '.creating'


class CacheTable:
    """Row-indexed arrays (one row per example) and which rows hold a recorded output.

    In memory the arrays are tensors; on disk they are memory-mapped ``.npy`` files viewed as tensors, so reading
    a row reads only its pages.

    Args:
        arrays (dict[str, torch.Tensor]): The arrays by name, each with one row per example.
        filled (torch.Tensor): ``[n_rows]`` booleans, true where a row holds a recorded output.
        files (Sequence[np.memmap], optional): The memory maps behind the arrays, flushed by :meth:`flush`.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], filled: torch.Tensor, files: Sequence[np.memmap] = ()):
        self.arrays = arrays
        self.filled = filled
        self._files = list(files)

    def read(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each array's ``rows``, as new tensors."""
        return {name: array.index_select(0, rows) for name, array in self.arrays.items()}

    def write(self, rows: torch.Tensor, data: Mapping[str, torch.Tensor]) -> None:
        """Store ``data[name][i]`` as row ``rows[i]`` of each array, then mark those rows filled."""
        for name, array in self.arrays.items():
            array[rows] = data[name].to(array.dtype)
        self.filled[rows] = True  # only once the outputs are in place

    def flush(self) -> None:
        """Write the memory-mapped files' changes to disk (nothing to do in memory)."""
        for file in self._files:
            file.flush()


# ---- the format ------------------------------------------------------------------------------------------------


def table_layout(n_rows: int, row_shape: Sequence[int], top_k: Optional[int], tail: str, dtype: torch.dtype) -> dict:
    """The arrays a cache of ``n_rows`` examples holds, for logits of ``row_shape`` per example.

    Args:
        n_rows (int): How many examples.
        row_shape (Sequence[int]): One example's logits, classes last.
        top_k (int, optional): Classes kept per position, or ``None`` for all.
        tail (str): ``'uniform'`` (the dropped mass is kept) or ``'drop'``.
        dtype (torch.dtype): The logits' storage dtype.

    Returns:
        dict: The :data:`Layout`.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache.storage import table_layout

            layout = table_layout(10, (5, 100), top_k=8, tail='uniform', dtype=torch.bfloat16)
            assert layout['values'] == ((10, 5, 8), torch.bfloat16)
            assert layout['indices'] == ((10, 5, 8), torch.int32) and layout['tail'] == ((10, 5), torch.float32)
    """
    positions = tuple(row_shape[:-1])
    if top_k is None:
        return {'values': ((n_rows, *row_shape), dtype)}
    layout = {
        'values': ((n_rows, *positions, top_k), dtype),
        'indices': ((n_rows, *positions, top_k), torch.int32),
    }
    if tail == 'uniform':
        layout['tail'] = ((n_rows, *positions), torch.float32)
    return layout


def encode_logits(logits: torch.Tensor, top_k: Optional[int], tail: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Teacher logits as the arrays of :func:`table_layout` (on the logits' device).

    Args:
        logits (torch.Tensor): ``[n, ..., V]`` logits of ``n`` examples.
        top_k (int, optional): Classes kept per position, or ``None`` for all.
        tail (str): ``'uniform'`` or ``'drop'``.
        dtype (torch.dtype): The storage dtype of the logits.

    Returns:
        dict[str, torch.Tensor]: ``values`` and, with ``top_k``, ``indices`` (and ``tail`` when uniform).

    Raises:
        ValueError: If a finite logit overflows ``dtype``.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache.storage import decode_logits, encode_logits

            logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
            arrays = encode_logits(logits, top_k=2, tail='drop', dtype=torch.float32)
            assert arrays['indices'].tolist() == [[0, 2]] and 'tail' not in arrays
            rebuilt = decode_logits(arrays, top_k=2, vocab_size=4)
            assert rebuilt[0, 1] == float('-inf') and rebuilt[0, 0] == 3.0
    """
    if top_k is None:
        source, data = logits, {}
    else:
        source, indices, dropped = topk_compress(logits, top_k)
        data = {'indices': indices.to(torch.int32)}
        if tail == 'uniform':
            data['tail'] = dropped
    data['values'] = source.to(dtype)
    if dtype != source.dtype and bool((torch.isinf(data['values']) & torch.isfinite(source)).any()):
        raise ValueError(
            f'Teacher logits reach {float(source.abs().max()):.4g}, beyond the range of the cache dtype '
            f'{str(dtype).removeprefix("torch.")}; use dtype=torch.bfloat16 or torch.float32.'
        )
    return data


def decode_logits(arrays: Mapping[str, torch.Tensor], top_k: Optional[int], vocab_size: int) -> torch.Tensor:
    """The logits that :func:`encode_logits` arrays stand for.

    Args:
        arrays (Mapping[str, torch.Tensor]): Rows read from a table.
        top_k (int, optional): As they were encoded with.
        vocab_size (int): The number of classes.

    Returns:
        torch.Tensor: Full logits in the storage dtype, or, with ``top_k``, dense float32 logits rebuilt by
        :func:`.topk_logits`.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache.storage import decode_logits

            values = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
            assert decode_logits({'values': values}, top_k=None, vocab_size=2) is values
    """
    if top_k is None:
        return arrays['values']
    return topk_logits(arrays['values'], arrays['indices'], vocab_size, arrays.get('tail'))


# ---- in memory and on disk -------------------------------------------------------------------------------------


def memory_table(layout: Layout) -> CacheTable:
    """A table of CPU tensors with nothing recorded (the arrays are uninitialized).

    Args:
        layout (Layout): The arrays, as :func:`table_layout` gives them.

    Returns:
        CacheTable: The table.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache.storage import memory_table

            table = memory_table({'values': ((3, 2), torch.float32)})
            table.write(torch.tensor([1]), {'values': torch.tensor([[5.0, 6.0]])})
            assert table.filled.tolist() == [False, True, False]
    """
    arrays = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}
    n_rows = next(iter(layout.values()))[0][0]
    return CacheTable(arrays, torch.zeros(n_rows, dtype=torch.bool))


def _open_npy(path: str, shape: tuple[int, ...], dtype: torch.dtype, create: bool) -> tuple[torch.Tensor, np.memmap]:
    if create:
        array = np.lib.format.open_memmap(path, mode='w+', dtype=_NUMPY_DTYPES[dtype], shape=shape)
    else:
        array = np.load(path, mmap_mode='r+')
        if tuple(array.shape) != tuple(shape) or array.dtype != _NUMPY_DTYPES[dtype]:
            raise StaleTeacherCacheError(
                f'Teacher cache file {path!r} holds {array.dtype}{tuple(array.shape)}, expected '
                f'{np.dtype(_NUMPY_DTYPES[dtype])}{tuple(shape)}: it was not written by this version.'
            )
    tensor = torch.from_numpy(array)
    return (tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor), array


def disk_table(folder: str, layout: Layout, create: bool) -> CacheTable:
    """A table of memory-mapped ``<name>.npy`` files in ``folder``, and ``filled.npy``.

    Args:
        folder (str): An existing folder.
        layout (Layout): The arrays, as :func:`table_layout` gives them.
        create (bool): Create the files (nothing recorded), or open those there.

    Returns:
        CacheTable: The table.

    Raises:
        StaleTeacherCacheError: If a file opened holds another shape or dtype than ``layout`` says.

    Example:
        .. testcode::

            import os, tempfile
            import torch
            from composer_kd.cache.storage import disk_table

            folder = tempfile.mkdtemp()
            layout = {'values': ((2, 3), torch.bfloat16)}
            disk_table(folder, layout, create=True).write(torch.tensor([0]), {'values': torch.ones(1, 3)})
            reopened = disk_table(folder, layout, create=False)
            assert reopened.filled.tolist() == [True, False] and reopened.arrays['values'].dtype == torch.bfloat16
    """
    arrays, files = {}, []
    n_rows = next(iter(layout.values()))[0][0]
    for name, (shape, dtype) in layout.items():
        arrays[name], file = _open_npy(os.path.join(folder, f'{name}.npy'), shape, dtype, create)
        files.append(file)
    filled, file = _open_npy(os.path.join(folder, 'filled.npy'), (n_rows,), torch.bool, create)
    return CacheTable(arrays, filled, [*files, file])


def read_meta(folder: str) -> Optional[dict[str, Any]]:
    """The ``meta.json`` of a cache folder (its fingerprint, ``row_shape`` and ``n_rows``), or ``None`` if absent.

    Args:
        folder (str): The cache folder.

    Returns:
        dict | None: What :func:`write_meta` wrote.

    Example:
        .. testcode::

            import tempfile
            from composer_kd.cache.storage import read_meta, write_meta

            folder = tempfile.mkdtemp()
            assert read_meta(folder) is None
            write_meta(folder, {'row_shape': [3]})
            assert read_meta(folder) == {'row_shape': [3]}
    """
    path = os.path.join(folder, _META_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_meta(folder: str, meta: Mapping[str, Any]) -> None:
    """Write ``meta.json`` atomically: a folder without it holds nothing trusted, so it is written last.

    Args:
        folder (str): The cache folder.
        meta (Mapping[str, Any]): JSON-able description of the files.
    """
    path = os.path.join(folder, _META_FILE)
    temporary = path + f'.{os.getpid()}.tmp'
    with open(temporary, 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(temporary, path)


def create_disk_table(folder: str, layout: Layout, meta: Mapping[str, Any]) -> CacheTable:
    """Create the folder's files and then its ``meta.json``; with several processes, only the first to come does.

    The others wait for ``meta.json`` and open the files it describes.

    Args:
        folder (str): The cache folder (created if missing).
        layout (Layout): The arrays, as :func:`table_layout` gives them.
        meta (Mapping[str, Any]): What :func:`write_meta` writes.

    Returns:
        CacheTable: The table on those files.

    Raises:
        TimeoutError: If another process holds the creation lock for 10 minutes without writing ``meta.json``.
    """
    os.makedirs(folder, exist_ok=True)
    if dist.get_world_size() == 1:
        table = disk_table(folder, layout, create=True)
        write_meta(folder, meta)
        return table
    # Processes sharing the folder: the first to get here creates the files, the others open them.
    lock = os.path.join(folder, _LOCK_FILE)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        _wait_for_meta(folder, lock)
    else:
        try:
            if not os.path.exists(os.path.join(folder, _META_FILE)):
                table = disk_table(folder, layout, create=True)
                write_meta(folder, meta)
                return table
        finally:
            os.remove(lock)
    return disk_table(folder, layout, create=False)


def _wait_for_meta(folder: str, lock: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(os.path.join(folder, _META_FILE)):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f'{_rank_prefix()}Waited {timeout_s:.0f} s for another process to create the teacher cache in '
                f'{folder!r}; if no run is creating it, remove the stale lock {lock!r}.'
            )
        time.sleep(0.05)


def _rank_prefix() -> str:
    return f'[rank {dist.get_global_rank()}] ' if dist.get_world_size() > 1 else ''


# ---- several processes -----------------------------------------------------------------------------------------


def all_gather_rows(
    table: CacheTable, rows: torch.Tensor, to_device: Callable[[torch.Tensor], torch.Tensor], counts: Sequence[int]
) -> None:
    """Give every process's ``table`` the rows each process recorded, in all_gathers of at most 64 MiB.

    Every process must call it at once, with the same ``counts``.

    Args:
        table (CacheTable): This process's table, of the same layout as the others'.
        rows (torch.Tensor): The rows this process recorded and the others may lack.
        to_device (Callable): Moves a tensor where the process group communicates (the GPU for NCCL).
        counts (Sequence[int]): How many rows each process shares.
    """
    row_bytes = sum(a[0].numel() * a.element_size() for a in table.arrays.values())
    chunk = max(1, _EXCHANGE_CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, max(counts), chunk):
        size = min(chunk, max(counts) - start)
        part = rows[start : start + size]
        padded = torch.full((size,), -1, dtype=torch.long)
        padded[: part.numel()] = part
        safe = padded.clamp(min=0)
        gathered_rows = [r.to('cpu') for r in dist.all_gather(to_device(padded))]
        gathered = {
            name: [a.to('cpu') for a in dist.all_gather(to_device(array.index_select(0, safe)))]
            for name, array in table.arrays.items()
        }
        for rank, ranked_rows in enumerate(gathered_rows):
            new = (ranked_rows >= 0) & ~table.filled[ranked_rows.clamp(min=0)]
            if bool(new.any()):
                table.write(ranked_rows[new], {name: arrays[rank][new] for name, arrays in gathered.items()})
