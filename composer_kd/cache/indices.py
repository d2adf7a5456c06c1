"""Example indices carried through the batch: attaching them to examples, collating them, and taking them off.

:class:`~composer_kd.cache.TeacherCache` keys recorded outputs by each example's position in the training dataset.
:class:`IndexedDataset` attaches that position to every example, :func:`indexed_collate` keeps it apart from a
custom collate function, and :func:`detach_index` takes it off the collated batch again before the student sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional

import torch
from composer.utils import batch_get
from torch.utils.data import Dataset, default_collate

from composer_kd.models.outputs import Key

__all__ = [
    'INDEX_KEY',
    'IndexedDataset',
    'IndexedSample',
    'attach_index',
    'check_indices',
    'detach_index',
    'indexed_collate',
    'read_index',
    'unwrap_indexed',
]

#: The batch key (for mapping samples) under which :class:`IndexedDataset` puts the index by default.
INDEX_KEY = 'index'


class IndexedSample(NamedTuple):
    """An example that is neither a sequence nor a mapping (e.g. a bare tensor), paired with its index.

    Collating these gives an ``IndexedSample`` of the collated batch and the index tensor, so the batch can be
    given back exactly as it was.
    """

    sample: Any
    index: Any


def attach_index(sample: Any, index: Any, key: str = INDEX_KEY) -> Any:
    """``sample`` carrying ``index``: a mapping gains ``key``, a tuple or list gains a last element, anything else
    becomes an :class:`IndexedSample`. Works the same on single examples and on collated batches.

    Example:
        .. testcode::

            from composer_kd.cache import attach_index

            assert attach_index(('x', 'y'), 7) == ('x', 'y', 7)
            assert attach_index({'input_ids': 'ids'}, 7) == {'input_ids': 'ids', 'index': 7}
    """
    if isinstance(sample, Mapping):
        if key in sample:
            raise ValueError(f'The example already has an entry {key!r}; choose another key for the index.')
        return {**sample, key: index}
    if isinstance(sample, IndexedSample) or not isinstance(sample, (tuple, list)):
        return IndexedSample(sample, index)
    if isinstance(sample, tuple) and hasattr(sample, '_fields'):  # another named tuple: keep its elements
        return (*sample, index)
    return type(sample)([*sample, index])


def detach_index(batch: Any, key: str = INDEX_KEY) -> tuple[Any, torch.Tensor]:
    """Undo :func:`attach_index` on a collated batch: the batch as it was, and the index tensor.

    A mapping loses ``key`` (a new dict; the given one is not changed), a tuple or list its last element.

    Raises:
        ValueError: If the batch carries no integer index tensor where it should.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache import detach_index

            batch, index = detach_index([torch.zeros(2, 3), torch.tensor([1, 0]), torch.tensor([5, 9])])
            assert len(batch) == 2 and index.tolist() == [5, 9]
    """
    if isinstance(batch, IndexedSample):
        rest, index = batch.sample, batch.index
    elif isinstance(batch, Mapping) and key in batch:
        rest = {k: v for k, v in batch.items() if k != key}
        index = batch[key]
    elif isinstance(batch, (tuple, list)) and not isinstance(batch, Mapping) and len(batch) >= 2:
        rest, index = (list(batch[:-1]) if isinstance(batch, list) else tuple(batch[:-1])), batch[-1]
    else:
        raise ValueError(
            f'The training batch ({type(batch).__name__}) carries no example indices: wrap the training dataset in '
            f'IndexedDataset (and a custom collate_fn in indexed_collate), or pass TeacherCache(index_key=...).'
        )
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.ndim != 1:
        raise ValueError(
            f'The example indices in the batch must be a 1-D integer tensor, got {type(index).__name__}'
            f'{tuple(index.shape) if isinstance(index, torch.Tensor) else ""}; was the index attached by '
            'IndexedDataset and collated by the DataLoader?'
        )
    return rest, index


class IndexedDataset(Dataset):
    """A map-style dataset whose examples carry their own index, for :class:`.TeacherCache`.

    ``IndexedDataset(dataset)[i]`` is ``dataset[i]`` with ``i`` attached (see :func:`attach_index`): a dict
    example gains the key ``key``, a tuple or list example a last element, any other example becomes an
    :class:`IndexedSample`. PyTorch's default collate keeps the index as a tensor in the batch; wrap a custom
    ``collate_fn`` in :func:`indexed_collate`. ``Distillation`` removes the index before the student (and every
    loss and metric) sees the batch, so the student receives exactly what ``dataset`` alone would have given it.

    Args:
        dataset (Dataset): A map-style dataset (``__len__`` and ``__getitem__``).
        key (str, optional): The key used for dict examples. Default: ``'index'``.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import DataLoader, TensorDataset
            from composer_kd import IndexedDataset

            data = IndexedDataset(TensorDataset(torch.randn(6, 3), torch.arange(6)))
            x, y, index = next(iter(DataLoader(data, batch_size=4)))
            assert index.tolist() == [0, 1, 2, 3]
    """

    def __init__(self, dataset: Dataset, key: str = INDEX_KEY):
        if not hasattr(dataset, '__len__') or not hasattr(dataset, '__getitem__'):
            raise TypeError(
                f'IndexedDataset needs a map-style dataset (__len__ and __getitem__), got {type(dataset).__name__}.'
            )
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return attach_index(self.dataset[index], int(index), self.key)


def indexed_collate(collate_fn: Optional[Callable[[list], Any]] = None, key: str = INDEX_KEY) -> Callable[[list], Any]:
    """A ``collate_fn`` for :class:`IndexedDataset` examples built on ``collate_fn`` (default: PyTorch's).

    The indices are taken off the examples, ``collate_fn`` collates the bare examples (so a padding collator
    never sees them), and the index tensor is attached to whatever it returns.

    Args:
        collate_fn (Callable, optional): Collates the examples without their indices. Default: PyTorch's
            ``default_collate``.
        key (str, optional): Where the index tensor goes in the batch. Default: ``'index'``.

    Returns:
        Callable[[list], Any]: The ``collate_fn`` to give the ``DataLoader``.

    Example:
        .. testcode::

            import torch
            from composer_kd import IndexedDataset, indexed_collate

            data = IndexedDataset([{'input_ids': torch.tensor([1, 2])}, {'input_ids': torch.tensor([3, 4])}])
            batch = indexed_collate()([data[0], data[1]])
            assert batch['index'].tolist() == [0, 1] and batch['input_ids'].shape == (2, 2)
    """
    collate = collate_fn or default_collate

    def collate_indexed(samples: list) -> Any:
        bare, indices = [], []
        for sample in samples:
            rest, index = _detach_one(sample, key)
            bare.append(rest)
            indices.append(index)
        return attach_index(collate(bare), torch.tensor(indices, dtype=torch.long), key)

    return collate_indexed


def _detach_one(sample: Any, key: str) -> tuple[Any, int]:
    if isinstance(sample, IndexedSample):
        return sample.sample, int(sample.index)
    if isinstance(sample, Mapping):
        return {k: v for k, v in sample.items() if k != key}, int(sample[key])
    return type(sample)(sample[:-1]) if isinstance(sample, list) else tuple(sample[:-1]), int(sample[-1])


def unwrap_indexed(dataset: Any) -> Any:
    """The dataset an :class:`IndexedDataset` wraps, or ``dataset`` itself: what the examples are without indices.

    Args:
        dataset: Any dataset.

    Returns:
        Any: ``dataset.dataset`` for an :class:`IndexedDataset`, else ``dataset``.

    Example:
        .. testcode::

            from composer_kd.cache import IndexedDataset
            from composer_kd.cache.indices import unwrap_indexed

            data = ['a', 'b']
            assert unwrap_indexed(IndexedDataset(data)) is data and unwrap_indexed(data) is data
    """
    return dataset.dataset if isinstance(dataset, IndexedDataset) else dataset


def read_index(batch: Any, key: Key) -> torch.Tensor:
    """The example indices held in the batch entry ``key`` (as Composer's ``batch_get`` takes it), flattened.

    Args:
        batch: A collated batch.
        key (int | str | Callable): Where the indices are.

    Returns:
        torch.Tensor: ``[n]`` indices, where the batch keeps them.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache.indices import read_index

            assert read_index({'x': torch.zeros(2, 3), 'id': torch.tensor([[4], [1]])}, 'id').tolist() == [4, 1]
    """
    return torch.as_tensor(batch_get(batch, key)).reshape(-1)


def check_indices(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``rows`` as a flat CPU int64 tensor, once each is checked to index a training dataset of ``n_rows`` examples.

    Args:
        rows (torch.Tensor): Example indices.
        n_rows (int): The dataset's length.

    Returns:
        torch.Tensor: ``[n]`` int64 indices on the CPU.

    Raises:
        IndexError: If an index is negative or not below ``n_rows``.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache.indices import check_indices

            assert check_indices(torch.tensor([[3], [0]], dtype=torch.int32), n_rows=4).tolist() == [3, 0]
            try:
                check_indices(torch.tensor([4]), n_rows=4)
            except IndexError as error:
                assert 'Example index 4 is outside' in str(error)
    """
    rows = rows.reshape(-1).to('cpu', torch.long)
    if rows.numel():
        low, high = (int(v) for v in rows.aminmax())
        if low < 0 or high >= n_rows:
            raise IndexError(
                f'Example index {high if high >= n_rows else low} is outside the training dataset of '
                f'{n_rows} examples the teacher cache was bound to.'
            )
    return rows
