"""Teacher outputs recorded once per training example and read back afterwards: offline distillation.

A frozen teacher gives the same logits for the same input every epoch, so after the first epoch its forward pass
is pure repetition. :class:`TeacherCache` records the (averaged) teacher logits of every example the first time it
is seen, keyed by the example's index in the training dataset, and later epochs read them back without running
the teacher at all. The index reaches the algorithm through :class:`IndexedDataset` (which attaches it to every
example and is removed again before the student sees the batch) or through a batch entry the user names.

The module is a functional core (top-k compression and reconstruction, attaching and detaching indices, the
fingerprint, the search for random augmentation) and one class, :class:`TeacherCache`, that owns the storage (in
memory, or memory-mapped ``.npy`` files on disk) and the bookkeeping across microbatches, epochs, processes and
checkpoints. ``Distillation(teacher_cache=...)`` only calls it at the right events.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from composer.core import Event, Precision, State
from composer.utils import batch_get, dist, get_device
from torch import nn
from torch.utils.data import Dataset, default_collate

from composer_kd.outputs import Key, poisoned_rows
from composer_kd.teachers import FrozenTeachers, resolve_teacher_logits_key, teacher_logits

__all__ = [
    'IndexedDataset',
    'IndexedSample',
    'StaleTeacherCacheError',
    'TeacherCache',
    'attach_index',
    'cache_fingerprint',
    'detach_index',
    'find_augmentation',
    'indexed_collate',
    'topk_compress',
    'topk_logits',
]

#: The batch key (for mapping samples) under which :class:`IndexedDataset` puts the index by default.
INDEX_KEY = 'index'

# Bumped whenever the files' layout changes, so that an older cache is refused rather than misread.
_FORMAT_VERSION = 1
# The most bytes one all_gather moves when processes share what they recorded.
_EXCHANGE_CHUNK_BYTES = 64 * 2**20
# How many examples the fingerprint reads.
_SAMPLED_EXAMPLES = 16

_STORAGE_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
# numpy has no bfloat16: its bits are kept as int16 on disk and viewed back as bfloat16.
_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}


# --------------------------------------------------------------------------------------------------------------
# Top-k compression
# --------------------------------------------------------------------------------------------------------------


def topk_compress(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits of every position, their classes, and the log of the mass of the others.

    Args:
        logits (torch.Tensor): ``[..., V]`` logits, ``V > k``.
        k (int): How many to keep per position.

    Returns:
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``values [..., k]`` (as given), ``indices [..., k]`` and
        ``tail [...]``, ``logsumexp`` of the ``V - k`` other logits in float32 (``-inf`` when they are all
        ``-inf``).

    Example:
        .. testcode::

            import torch
            from composer_kd.cache import topk_compress

            values, indices, tail = topk_compress(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), k=2)
            assert indices.tolist() == [[0, 2]]
            assert torch.isclose(tail, torch.logsumexp(torch.tensor([[1.0, 0.0]]), dim=-1)).all()
    """
    vocab = logits.shape[-1]
    if not 0 < k < vocab:
        raise ValueError(f'top_k={k} must lie between 1 and the number of classes minus one ({vocab - 1}).')
    values, indices = logits.topk(k, dim=-1)
    rest = logits.float().scatter(-1, indices, float('-inf'))
    return values, indices, torch.logsumexp(rest, dim=-1)


def topk_logits(
    values: torch.Tensor, indices: torch.Tensor, vocab_size: int, tail: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Dense float32 logits rebuilt from top-k entries, for any loss that takes logits.

    The kept classes get their own logits. Every other class gets one shared logit: with ``tail`` (the
    ``logsumexp`` of the dropped logits, see :func:`topk_compress`) it is ``tail - log(V - k)``, so that at
    temperature 1 the kept classes' probabilities and the total mass of the others are exactly the teacher's, the
    latter spread evenly over them; without ``tail`` it is ``-inf``, so the distribution is renormalized over the
    kept classes alone. At a temperature ``T != 1`` the kept classes' logits are still exact, and the dropped
    classes keep their shared logit, so their mass at ``T`` is ``(V - k) * exp((tail - log(V - k)) / T)`` against
    ``sum exp(z_j / T)`` for the teacher: equal at ``T = 1`` and approximate elsewhere.

    Args:
        values (torch.Tensor): ``[..., k]`` kept logits.
        indices (torch.Tensor): ``[..., k]`` their classes.
        vocab_size (int): ``V``, the number of classes.
        tail (torch.Tensor, optional): ``[...]`` log of the dropped mass. Default: drop it.

    Returns:
        torch.Tensor: ``[..., V]`` float32 logits.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache import topk_compress, topk_logits

            logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
            values, indices, tail = topk_compress(logits, k=2)
            rebuilt = topk_logits(values, indices, vocab_size=4, tail=tail)
            # The kept classes' probabilities are the teacher's.
            assert torch.allclose(rebuilt.softmax(-1)[0, [0, 2]], logits.softmax(-1)[0, [0, 2]])
    """
    k = values.shape[-1]
    if tail is None:
        fill = torch.full(values.shape[:-1], float('-inf'), device=values.device)
    else:
        fill = tail.float() - math.log(vocab_size - k)
    dense = fill.unsqueeze(-1).expand(*values.shape[:-1], vocab_size).contiguous()
    return dense.scatter(-1, indices.long(), values.float())


# --------------------------------------------------------------------------------------------------------------
# Indices in the batch
# --------------------------------------------------------------------------------------------------------------


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
    """A map-style dataset whose examples carry their own index, for :class:`TeacherCache`.

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


def _unwrap(dataset: Any) -> Any:
    return dataset.dataset if isinstance(dataset, IndexedDataset) else dataset


# --------------------------------------------------------------------------------------------------------------
# Random augmentation
# --------------------------------------------------------------------------------------------------------------

# Transforms that draw random numbers (torchvision v1 and v2, and Composer's own) besides every 'Random*' class.
_RANDOM_TRANSFORMS = frozenset(
    {
        'AugMix',
        'AugmentAndMixTransform',
        'AutoAugment',
        'ColOutTransform',
        'ColorJitter',
        'CutMix',
        'ElasticTransform',
        'GaussianBlur',
        'GaussianNoise',
        'JPEG',
        'MixUp',
        'RandAugment',
        'RandAugmentTransform',
        'ScaleJitter',
        'TrivialAugmentWide',
    }
)
# Composer algorithms that change the inputs before the forward pass; others are found by the events they match.
_INPUT_CHANGING_ALGORITHMS = frozenset(
    {
        'AugMix',
        'ColOut',
        'CutMix',
        'CutOut',
        'MixUp',
        'ProgressiveResizing',
        'RandAugment',
        'SelectiveBackprop',
        'SeqLengthWarmup',
    }
)
_INPUT_EVENTS = (Event.AFTER_DATALOADER, Event.BEFORE_FORWARD)


def _is_random_transform(obj: Any) -> bool:
    name = type(obj).__name__
    return name.startswith('Random') or name in _RANDOM_TRANSFORMS


def _find_random_transform(obj: Any, where: str, seen: set[int]) -> Optional[str]:
    if obj is None or isinstance(obj, (str, bytes, int, float, torch.Tensor)) or id(obj) in seen:
        return None
    seen.add(id(obj))
    if _is_random_transform(obj):
        return f'{type(obj).__name__} (at {where})'
    if isinstance(obj, (list, tuple)):
        children = [(f'{where}[{i}]', child) for i, child in enumerate(obj)]
    else:
        # Compose / RandomApply / nn.Sequential hold 'transforms'; torchvision's StandardTransform a 'transform'.
        children = [
            (f'{where}.{attr}', getattr(obj, attr)) for attr in ('transforms', 'transform') if hasattr(obj, attr)
        ]
        if isinstance(obj, nn.Module) and not children:
            children = [(f'{where}.{name}', child) for name, child in obj.named_children()]
    for child_where, child in children:
        found = _find_random_transform(child, child_where, seen)
        if found:
            return found
    return None


def _find_in_dataset(dataset: Any, where: str, seen: set[int]) -> Optional[str]:
    if dataset is None or id(dataset) in seen:
        return None
    seen.add(id(dataset))
    for attr in ('transform', 'transforms'):
        found = _find_random_transform(getattr(dataset, attr, None), f'{where}.{attr}', seen)
        if found:
            return found
    inner = getattr(dataset, 'dataset', None)  # IndexedDataset, Subset, ...
    if inner is not None:
        found = _find_in_dataset(inner, f'{where}.dataset', seen)
        if found:
            return found
    for i, part in enumerate(getattr(dataset, 'datasets', None) or ()):  # ConcatDataset
        found = _find_in_dataset(part, f'{where}.datasets[{i}]', seen)
        if found:
            return found
    return None


def _changes_inputs(algorithm: Any, state: Optional[State]) -> bool:
    if type(algorithm).__name__ in _INPUT_CHANGING_ALGORITHMS:
        return True
    if state is None:
        return False
    for event in _INPUT_EVENTS:
        try:
            if algorithm.match(event, state):
                return True
        except Exception:  # noqa: BLE001 - a match that needs more state than FIT_START has says nothing here
            continue
    return False


def find_augmentation(dataset: Any, algorithms: Sequence[Any] = (), state: Optional[State] = None) -> Optional[str]:
    """Describe the first source of random augmentation found in the training data, or ``None``.

    Looked for: torchvision (v1 or v2) random transforms, and Composer's, in ``dataset.transform`` /
    ``dataset.transforms`` (through ``Compose``, ``RandomApply``, ``nn.Sequential``, and datasets wrapped in
    ``IndexedDataset``, ``Subset`` or ``ConcatDataset``): every class named ``Random*`` and ``ColorJitter``,
    ``GaussianBlur``, ``GaussianNoise``, ``ElasticTransform``, ``AutoAugment``, ``RandAugment``,
    ``TrivialAugmentWide``, ``AugMix``, ``JPEG``, ``ScaleJitter``, ``MixUp``, ``CutMix``; and Composer
    algorithms that change the batch before the forward pass: MixUp, CutMix, CutOut, RandAugment, AugMix, ColOut,
    ProgressiveResizing, SeqLengthWarmup, SelectiveBackprop, and any algorithm matching ``Event.AFTER_DATALOADER``
    or ``Event.BEFORE_FORWARD``. Algorithms that only change the targets (e.g. ``LabelSmoothing``) leave the
    teacher's input, and so its output, as it was.

    Args:
        dataset: The training dataset.
        algorithms (Sequence): The trainer's other algorithms.
        state (State, optional): The trainer's state, to ask each algorithm which events it matches.

    Returns:
        str | None: e.g. ``'RandomHorizontalFlip (at train_dataloader.dataset.transform.transforms[0])'``.

    Example:
        .. testcode::

            import torchvision.transforms as T
            from composer_kd.cache import find_augmentation

            class Images(list):
                transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor()])

            assert find_augmentation(Images()).startswith('RandomHorizontalFlip')
    """
    found = _find_in_dataset(dataset, 'train_dataloader.dataset', set())
    if found:
        return found
    for algorithm in algorithms:
        if _changes_inputs(algorithm, state):
            return f'Composer algorithm {type(algorithm).__name__} (it changes the batch before the forward pass)'
    return None


# --------------------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------------------


def _hash_tensor(h: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to('cpu').contiguous().reshape(-1)
    h.update(f'{tensor.dtype}{tuple(tensor.shape)}'.encode())
    h.update(tensor.view(torch.uint8).numpy().tobytes())


def _hash_object(h: Any, obj: Any) -> None:
    """Feed a canonical serialization of an example to ``h``: tensors and arrays by their bytes."""
    if isinstance(obj, torch.Tensor):
        _hash_tensor(h, obj)
    elif isinstance(obj, np.ndarray):
        h.update(f'{obj.dtype}{obj.shape}'.encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            h.update(str(key).encode())
            _hash_object(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f'{type(obj).__name__}{len(obj)}'.encode())
        for item in obj:
            _hash_object(h, item)
    elif obj is None or isinstance(obj, (str, int, float, bool, bytes)):
        h.update(repr(obj).encode())
    elif hasattr(obj, 'tobytes') and hasattr(obj, 'size'):  # a PIL image
        h.update(f'{getattr(obj, "mode", "")}{obj.size}'.encode())
        h.update(obj.tobytes())
    else:
        try:
            h.update(pickle.dumps(obj))
        except Exception:  # noqa: BLE001 - unpicklable: its type is all there is to go on
            h.update(type(obj).__qualname__.encode())


def _hash_examples(dataset: Any) -> str:
    """Hash up to 16 evenly spaced examples, under a fixed seed that leaves the caller's random state untouched."""
    n = len(dataset)
    picks = sorted({round(i * (n - 1) / (_SAMPLED_EXAMPLES - 1)) for i in range(_SAMPLED_EXAMPLES)}) if n else []
    h = hashlib.blake2b(digest_size=16)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            random.seed(0)
            np.random.seed(0)
            for i in picks:
                h.update(str(i).encode())
                _hash_object(h, dataset[i])
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return h.hexdigest()


def _hash_teacher(teacher: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(type(teacher).__qualname__.encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        if isinstance(tensor, torch.Tensor):
            h.update(name.encode())
            _hash_tensor(h, tensor)
    return h.hexdigest()


def _describe_key(key: Optional[Key]) -> Optional[str]:
    if key is None or isinstance(key, (int, str)):
        return None if key is None else repr(key)
    return getattr(key, '__qualname__', type(key).__qualname__)


def cache_fingerprint(
    teachers: Sequence[nn.Module],
    dataset: Any,
    *,
    top_k: Optional[int] = None,
    tail: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    precision: Union[str, Precision] = 'fp32',
    teacher_dtype: Optional[torch.dtype] = None,
    input_key: Optional[Key] = None,
    logits_key: Optional[Key] = None,
) -> dict[str, Any]:
    """What recorded teacher outputs depend on, as a JSON-able dict compared field by field.

    Fields: ``teachers`` (each teacher's class and a BLAKE2 hash of every tensor in its ``state_dict``),
    ``dataset_length``, ``dataset_examples`` (a hash of 16 evenly spaced examples, read under a fixed seed),
    ``top_k``, ``tail``, ``dtype``, ``precision``, ``teacher_dtype``, ``input_key``, ``logits_key`` and the files'
    ``format``. A callable key is known by its qualified name only.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache import cache_fingerprint

            teacher = torch.nn.Linear(3, 2)
            data = [torch.zeros(3), torch.ones(3)]
            assert cache_fingerprint([teacher], data) == cache_fingerprint([teacher], data)
            assert cache_fingerprint([teacher], data) != cache_fingerprint([teacher], data[:1])
    """
    dataset = _unwrap(dataset)
    return {
        'format': _FORMAT_VERSION,
        'teachers': [f'{type(t).__qualname__}:{_hash_teacher(t)}' for t in teachers],
        'dataset_length': len(dataset),
        'dataset_examples': _hash_examples(dataset),
        'top_k': top_k,
        'tail': tail if top_k is not None else None,
        'dtype': str(dtype).removeprefix('torch.'),
        'precision': Precision(precision).value,
        'teacher_dtype': None if teacher_dtype is None else str(teacher_dtype).removeprefix('torch.'),
        'input_key': _describe_key(input_key),
        'logits_key': _describe_key(logits_key),
    }


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    return [
        f'{key}: recorded {stored.get(key)!r}, now {current.get(key)!r}'
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]


class StaleTeacherCacheError(ValueError):
    """Recorded teacher outputs belong to another teacher, dataset or setting, and are not used.

    Raised by :class:`TeacherCache` with the path and what differs; a ``ValueError``, so code that treats bad
    input generally still catches it.

    Args:
        message (str): What was refused, and why.

    Example:
        .. testcode::

            from composer_kd import StaleTeacherCacheError

            try:
                raise StaleTeacherCacheError('cache/ was recorded for another teacher')
            except ValueError as error:
                assert 'another teacher' in str(error)
    """


# --------------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------------


class _Table:
    """Row-indexed arrays (one row per example) and which rows hold a recorded output.

    In memory the arrays are tensors; on disk they are memory-mapped ``.npy`` files viewed as tensors, so reading
    a row reads only its pages.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], filled: torch.Tensor, files: Sequence[np.memmap] = ()):
        self.arrays = arrays
        self.filled = filled
        self._files = list(files)

    def read(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: array.index_select(0, rows) for name, array in self.arrays.items()}

    def write(self, rows: torch.Tensor, data: Mapping[str, torch.Tensor]) -> None:
        for name, array in self.arrays.items():
            array[rows] = data[name].to(array.dtype)
        self.filled[rows] = True  # only once the outputs are in place

    def flush(self) -> None:
        for file in self._files:
            file.flush()


def _layout(n_rows: int, row_shape: Sequence[int], top_k: Optional[int], tail: str, dtype: torch.dtype) -> dict:
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


def _memory_table(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> _Table:
    arrays = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}
    n_rows = next(iter(layout.values()))[0][0]
    return _Table(arrays, torch.zeros(n_rows, dtype=torch.bool))


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


def _disk_table(folder: str, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], create: bool) -> _Table:
    arrays, files = {}, []
    n_rows = next(iter(layout.values()))[0][0]
    for name, (shape, dtype) in layout.items():
        arrays[name], file = _open_npy(os.path.join(folder, f'{name}.npy'), shape, dtype, create)
        files.append(file)
    filled, file = _open_npy(os.path.join(folder, 'filled.npy'), (n_rows,), torch.bool, create)
    return _Table(arrays, filled, [*files, file])


def _rank_prefix() -> str:
    return f'[rank {dist.get_global_rank()}] ' if dist.get_world_size() > 1 else ''


# --------------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------------


class TeacherCache:
    """Teacher logits recorded per training example on first sight, so later epochs never run the teacher.

    Pass it to ``Distillation(teachers, teacher_cache=TeacherCache(...))``. The first time an example is
    distilled, the teachers run as usual and their (averaged) logits are stored under the example's index in the
    training dataset; every later time they are read back, and a microbatch whose examples are all stored skips
    the teachers entirely. Outputs can also be recorded before training with :meth:`precompute`.

    **Where the index comes from.** Wrap the training dataset in :class:`IndexedDataset`: each example carries its
    index, ``Distillation`` takes it off the batch before the student sees it, and slices it per microbatch as
    Composer splits the batch (consecutive rows). Or name a batch entry that already holds it with
    ``index_key`` (e.g. a dataset's ``'idx'`` column), which is then read from every microbatch and left in place.
    The index is the example's position in the whole dataset, so it is the same on every process, whatever the
    sampler or shuffling.

    **Storage.** Without ``path`` the outputs live in CPU memory and are saved in training checkpoints (so a run
    resumed with ``load_path`` reads exactly what it would have read uninterrupted); the checkpoint grows by the
    cache's size. With ``path`` they are memory-mapped ``.npy`` files in that folder (``values.npy``, with top-k
    also ``indices.npy`` and ``tail.npy``, and ``filled.npy`` marking recorded rows), plus ``meta.json`` holding
    the fingerprint; they persist across runs and checkpoints only name them. Several processes on one machine
    share one folder; on several machines give each its own local folder.

    **Top-k.** With ``top_k`` only the ``k`` largest logits of each position are kept (values in ``dtype``,
    classes as int32) and, with ``tail='uniform'``, the float32 ``logsumexp`` of the others; the loss receives
    dense logits rebuilt by :func:`topk_logits` (the other classes share the remaining mass evenly; exact at
    temperature 1), or, with ``tail='drop'``, the kept classes renormalized.

    **Fingerprint.** The cache is bound to what its outputs depend on (:func:`cache_fingerprint`: the teachers'
    weights, the dataset's length and a sample of its examples, top-k, dtype, precision, keys). A folder or
    checkpoint recorded under another fingerprint is refused with :class:`StaleTeacherCacheError`, naming the path
    and each differing field; it is never used.

    **Augmentation.** Recorded outputs are those of the inputs seen the first time. With random augmentation,
    later epochs present other inputs, and the cached outputs would teach the student the teacher's answer to an
    input it is not looking at. So the cache refuses to run when :func:`find_augmentation` finds a random
    transform on the training dataset or a Composer algorithm that changes the batch before the forward pass,
    unless ``allow_augmentation=True`` (then the student is deliberately distilled on the first-epoch versions'
    outputs; list ``Distillation`` after such algorithms, so that it takes the index off the batch before them).

    Non-finite (NaN or +inf) teacher outputs are never stored; ``on_nonfinite_teacher`` treats them as without
    a cache, and the teacher runs again the next time those examples come. Recording copies each microbatch's
    outputs to the host, a synchronization the first epoch pays once per microbatch.

    Args:
        path (str, optional): A folder for memory-mapped files. Default: ``None``, keep the outputs in memory.
        top_k (int, optional): Keep only the ``k`` largest logits per position. Default: ``None``, all.
        tail (str, optional): With ``top_k``, ``'uniform'`` (spread the remaining mass evenly over the other
            classes) or ``'drop'`` (renormalize over the kept ones). Default: ``'uniform'``.
        dtype (torch.dtype, optional): Storage type of the logits: ``torch.float32`` (bitwise what the teacher
            gave, for float32 teachers), ``torch.bfloat16`` or ``torch.float16`` (half the size; float16 refuses
            logits beyond its range). Default: ``torch.float32``.
        index_key (int | str | Callable, optional): Read each example's index from this batch entry (as Composer's
            ``batch_get`` takes it) instead of from an :class:`IndexedDataset`. Default: ``None``.
        allow_augmentation (bool, optional): Record and reuse outputs even though the data are randomly
            augmented. Default: ``False``.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import DataLoader, TensorDataset
            from composer import Trainer
            from composer.models import ComposerClassifier
            from composer_kd import Distillation, IndexedDataset, TeacherCache

            data = IndexedDataset(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))))
            teacher = torch.nn.Linear(4, 3)
            trainer = Trainer(
                model=ComposerClassifier(torch.nn.Linear(4, 3), num_classes=3),
                train_dataloader=DataLoader(data, batch_size=8, shuffle=True),
                max_duration='2ep',
                algorithms=[Distillation(teacher, teacher_cache=TeacherCache())],
            )
            trainer.fit()  # the teacher ran 4 times (epoch 1), not 8
    """

    def __init__(
        self,
        path: Optional[Union[str, os.PathLike]] = None,
        top_k: Optional[int] = None,
        tail: str = 'uniform',
        dtype: torch.dtype = torch.float32,
        index_key: Optional[Key] = None,
        allow_augmentation: bool = False,
    ):
        if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
            raise ValueError(f'top_k must be a positive integer or None, got {top_k!r}.')
        if tail not in ('uniform', 'drop'):
            raise ValueError(f"tail must be 'uniform' or 'drop', got {tail!r}.")
        if dtype not in _STORAGE_DTYPES.values():
            raise ValueError(f'dtype must be one of {sorted(_STORAGE_DTYPES)} (as torch dtypes), got {dtype!r}.')
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        self.top_k = top_k
        self.tail = tail
        self.dtype = dtype
        self.index_key = index_key
        self.allow_augmentation = allow_augmentation

        self._fingerprint: Optional[dict[str, Any]] = None
        self._n_rows = 0
        self._row_shape: Optional[tuple[int, ...]] = None
        self._table: Optional[_Table] = None
        self._restored: Optional[dict[str, Any]] = None  # a checkpoint's cache, until the fit binds it
        self._unshared: list[torch.Tensor] = []  # rows recorded here since the processes last exchanged theirs
        # Per fit: where the index comes from, and the current batch's indices and how many rows are consumed.

    def __repr__(self) -> str:
        where = 'memory' if self.path is None else repr(self.path)
        return f'TeacherCache({where}, top_k={self.top_k}, dtype={str(self.dtype).removeprefix("torch.")})'

    # ---- state --------------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> Optional[dict[str, Any]]:
        """What the recorded outputs were bound to (see :func:`cache_fingerprint`); ``None`` before binding."""
        return self._fingerprint

    @property
    def n_recorded(self) -> int:
        """How many examples have a recorded output."""
        return 0 if self._table is None else int(self._table.filled.sum())

    def contains(self, rows: torch.Tensor) -> bool:
        """Whether every example in ``rows`` (dataset indices) has a recorded output."""
        return self._table is not None and bool(self._table.filled[rows.to('cpu', torch.long)].all())

    def clear(self) -> None:
        """Forget the outputs held in memory and the binding (files on disk are left as they are)."""
        self._fingerprint, self._table, self._row_shape, self._restored, self._unshared = None, None, None, None, []

    def _where(self) -> str:
        return f'teacher cache folder {self.path!r}' if self.path is not None else 'in-memory teacher cache'

    def bind(self, fingerprint: dict[str, Any], n_rows: int) -> None:
        """Tie the cache to ``fingerprint``: open a matching folder, or refuse a stale one, memory or checkpoint.

        Raises:
            StaleTeacherCacheError: If recorded outputs exist under another fingerprint; the message names where
                they are and every differing field.
        """
        if self._restored is not None:
            restored, self._restored = self._restored, None
            differences = _differences(restored['fingerprint'], fingerprint)
            if differences:
                self._table, self._row_shape = None, None  # never to be used, not even by a later fit
                raise StaleTeacherCacheError(
                    f'The {self._where()} saved in the checkpoint was recorded for another teacher or data '
                    f'({"; ".join(differences)}); it is not used. Resume with the teacher and data it was recorded '
                    'with, or load the checkpoint with load_exclude_algorithms=["Distillation"].'
                )
            self._fingerprint = restored['fingerprint']
        if self._fingerprint is not None and self._fingerprint != fingerprint:
            raise StaleTeacherCacheError(
                f'The {self._where()} holds outputs recorded for another teacher or data '
                f'({"; ".join(_differences(self._fingerprint, fingerprint))}); it is not used. Call clear() on it or '
                'use a new TeacherCache.'
            )
        self._n_rows = n_rows
        if self.path is not None:
            self._bind_folder(fingerprint)
        self._fingerprint = fingerprint

    def _meta_path(self) -> str:
        assert self.path is not None
        return os.path.join(self.path, 'meta.json')

    def _bind_folder(self, fingerprint: dict[str, Any]) -> None:
        meta_path = self._meta_path()
        if not os.path.exists(meta_path):
            self._table, self._row_shape = None, None  # nothing recorded there (yet, or any more)
            return
        with open(meta_path) as f:
            meta = json.load(f)
        differences = _differences(meta.get('fingerprint', {}), fingerprint)
        if differences:
            raise StaleTeacherCacheError(
                f'The teacher cache at {self.path!r} was recorded for another teacher or data and is not used: '
                f'{"; ".join(differences)}. Delete that folder (or pass another path) to record a new cache.'
            )
        if self._table is None:
            self._row_shape = tuple(meta['row_shape'])
            self._table = _disk_table(self.path, self._layout(), create=False)  # type: ignore[arg-type]

    def _layout(self) -> dict:
        assert self._row_shape is not None
        return _layout(self._n_rows, self._row_shape, self.top_k, self.tail, self.dtype)

    def _create_table(self, row_shape: tuple[int, ...]) -> None:
        self._row_shape = row_shape
        if self.path is None:
            self._table = _memory_table(self._layout())
            return
        os.makedirs(self.path, exist_ok=True)
        if dist.get_world_size() == 1:
            self._table = _disk_table(self.path, self._layout(), create=True)
            self._write_meta()
            return
        # Processes sharing the folder: the first to get here creates the files, the others open them.
        lock = os.path.join(self.path, '.creating')
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            self._wait_for_meta(lock)
        else:
            try:
                if not os.path.exists(self._meta_path()):
                    self._table = _disk_table(self.path, self._layout(), create=True)
                    self._write_meta()
                    return
            finally:
                os.remove(lock)
        self._table = _disk_table(self.path, self._layout(), create=False)

    def _write_meta(self) -> None:
        meta = {'fingerprint': self._fingerprint, 'row_shape': list(self._row_shape or ()), 'n_rows': self._n_rows}
        temporary = self._meta_path() + f'.{os.getpid()}.tmp'
        with open(temporary, 'w') as f:
            json.dump(meta, f, indent=1)
        os.replace(temporary, self._meta_path())  # written last: a folder without it holds nothing trusted

    def _wait_for_meta(self, lock: str, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self._meta_path()):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f'{_rank_prefix()}Waited {timeout_s:.0f} s for another process to create the teacher cache in '
                    f'{self.path!r}; if no run is creating it, remove the stale lock {lock!r}.'
                )
            time.sleep(0.05)

    def state_dict(self) -> dict[str, Any]:
        """The binding and, for an in-memory cache, every recorded output (a disk cache is only named)."""
        state: dict[str, Any] = {'fingerprint': self._fingerprint, 'path': self.path}
        if self.path is None and self._table is not None:
            rows = self._table.filled.nonzero().flatten()
            state.update(row_shape=self._row_shape, n_rows=self._n_rows, rows=rows, arrays=self._table.read(rows))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take a checkpoint's cache; it is checked against the fit's fingerprint when the fit starts."""
        if state.get('fingerprint') is None:
            return
        if (state.get('path') is None) != (self.path is None):
            kind = 'in memory' if state.get('path') is None else f'in {state.get("path")!r}'
            raise ValueError(f'The checkpoint recorded its teacher cache {kind}, but this TeacherCache is {self!r}.')
        self._restored = {'fingerprint': state['fingerprint']}
        if self.path is None and state.get('rows') is not None:
            self._n_rows, self._row_shape = int(state['n_rows']), tuple(state['row_shape'])
            self._table = _memory_table(self._layout())
            self._table.write(state['rows'], state['arrays'])
            self._unshared = []

    # ---- recording and reading ----------------------------------------------------------------------------

    def _check_rows(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.reshape(-1).to('cpu', torch.long)
        if rows.numel():
            low, high = (int(v) for v in rows.aminmax())
            if low < 0 or high >= self._n_rows:
                raise IndexError(
                    f'Example index {high if high >= self._n_rows else low} is outside the training dataset of '
                    f'{self._n_rows} examples the teacher cache was bound to.'
                )
        return rows

    def lookup(self, rows: torch.Tensor, device: Union[str, torch.device] = 'cpu') -> Optional[torch.Tensor]:
        """The recorded logits of ``rows`` on ``device``, or ``None`` unless every one of them is recorded.

        Full logits come back in the storage dtype; top-k ones as dense float32 logits (see
        :func:`topk_logits`).
        """
        rows = self._check_rows(rows)
        if self._table is None or not bool(self._table.filled[rows].all()):
            return None
        arrays = {name: array.to(device, non_blocking=True) for name, array in self._table.read(rows).items()}
        if self.top_k is None:
            return arrays['values']
        assert self._row_shape is not None
        return topk_logits(arrays['values'], arrays['indices'], self._row_shape[-1], arrays.get('tail'))

    def record(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Store ``logits[i]`` as example ``rows[i]``'s teacher output, unless recorded or not finite.

        Raises:
            ValueError: If the logits per example do not have the shape the cache holds, or ``dtype`` cannot hold
                them.
        """
        rows = self._check_rows(rows)
        if logits.shape[0] != rows.numel():
            raise ValueError(f'{rows.numel()} example indices for teacher logits of shape {tuple(logits.shape)}.')
        row_shape = tuple(logits.shape[1:])
        if self._table is None:
            if not row_shape:
                raise ValueError('Teacher logits must have a class dimension; got one number per example.')
            if self.top_k is not None and not self.top_k < row_shape[-1]:
                raise ValueError(
                    f'top_k={self.top_k} must be smaller than the number of classes ({row_shape[-1]}); use top_k=None.'
                )
            self._create_table(row_shape)
        elif row_shape != self._row_shape:
            raise ValueError(
                f'Teacher logits per example have shape {row_shape}, but the {self._where()} holds {self._row_shape}: '
                'every example must give one shape (pad sequences to a fixed length).'
            )
        assert self._table is not None
        logits = logits.detach()
        bad = poisoned_rows(logits)
        data = self._encode(logits)
        keep = (~bad).to('cpu') & ~self._table.filled[rows]
        if not bool(keep.any()):
            return
        rows = rows[keep]
        self._table.write(rows, {name: array.to('cpu')[keep] for name, array in data.items()})
        self._unshared.append(rows)

    def _encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.top_k is None:
            source, data = logits, {}
        else:
            source, indices, tail = topk_compress(logits, self.top_k)
            data = {'indices': indices.to(torch.int32)}
            if self.tail == 'uniform':
                data['tail'] = tail
        data['values'] = source.to(self.dtype)
        if self.dtype != source.dtype and bool((torch.isinf(data['values']) & torch.isfinite(source)).any()):
            raise ValueError(
                f'Teacher logits reach {float(source.abs().max()):.4g}, beyond the range of the cache dtype '
                f'{str(self.dtype).removeprefix("torch.")}; use dtype=torch.bfloat16 or torch.float32.'
            )
        return data

    def flush(self) -> None:
        """Write what is recorded to disk (a no-op in memory)."""
        if self._table is not None:
            self._table.flush()

    # ---- several processes --------------------------------------------------------------------------------

    def exchange(self, to_device: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Share what each process recorded since the last exchange, so every process holds every row.

        In memory, the new rows are all-gathered (in chunks of at most 64 MiB) and stored by every process. On
        disk, processes write into the same files; here they flush them and wait for each other. A no-op in a
        single process. Every process must call it at the same point (``Distillation`` does at each epoch end).

        Args:
            to_device (Callable): Moves a tensor where the process group communicates (the GPU for NCCL).
        """
        if dist.get_world_size() == 1:
            self._unshared = []
            return
        if self.path is not None:
            self.flush()
            dist.barrier()
            self._unshared = []
            if self._table is None and os.path.exists(self._meta_path()):
                with open(self._meta_path()) as f:
                    self._row_shape = tuple(json.load(f)['row_shape'])
                self._table = _disk_table(self.path, self._layout(), create=False)
            return
        rows = torch.cat(self._unshared) if self._unshared else torch.zeros(0, dtype=torch.long)
        self._unshared = []
        counts = [int(c) for c in dist.all_gather(to_device(torch.tensor([rows.numel()])))]
        shapes = dist.all_gather_object(None if self._row_shape is None else list(self._row_shape))
        row_shape = next((tuple(s) for s in shapes if s is not None), None)
        if max(counts) == 0 or row_shape is None:
            return
        if self._table is None:
            self._create_table(row_shape)
        assert self._table is not None
        row_bytes = sum(a[0].numel() * a.element_size() for a in self._table.arrays.values())
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
                for name, array in self._table.arrays.items()
            }
            for rank, ranked_rows in enumerate(gathered_rows):
                new = (ranked_rows >= 0) & ~self._table.filled[ranked_rows.clamp(min=0)]
                if bool(new.any()):
                    self._table.write(ranked_rows[new], {name: arrays[rank][new] for name, arrays in gathered.items()})

    # ---- inside a Composer fit ----------------------------------------------------------------------------

    def start(
        self,
        state: State,
        teachers: Sequence[nn.Module],
        *,
        input_key: Optional[Key] = None,
        logits_key: Optional[Key] = None,
        teacher_dtype: Optional[torch.dtype] = None,
        algorithms: Sequence[Any] = (),
    ) -> CachedFit:
        """Check the training data, bind the cache at the start of a fit, and return what drives it during the fit.

        ``Distillation`` calls it when a fit starts and hands the events of the fit to the returned object.

        Returns:
            CachedFit: The cache's state for this fit.

        Raises:
            ValueError: If the data are randomly augmented (the message names the transform or algorithm) and
                ``allow_augmentation`` is off, or no example index can be found.
            StaleTeacherCacheError: If recorded outputs belong to another fingerprint.
        """
        dataset = getattr(state.train_dataloader, 'dataset', None)
        if dataset is None or not hasattr(dataset, '__len__') or not hasattr(dataset, '__getitem__'):
            raise ValueError(
                'teacher_cache needs a training DataLoader over a map-style dataset (with __len__ and __getitem__) to '
                f'key outputs by example; got {type(state.train_dataloader).__name__} over {type(dataset).__name__}.'
            )
        index_from_dataset = isinstance(dataset, IndexedDataset) and self.index_key is None
        if not index_from_dataset and self.index_key is None:
            raise ValueError(
                "teacher_cache needs each example's dataset index: wrap the training dataset in "
                'IndexedDataset(dataset) (the index is removed before the student sees the batch), or name a batch '
                'entry holding it with TeacherCache(index_key=...).'
            )
        self._refuse_augmentation(dataset, algorithms, state)
        fingerprint = cache_fingerprint(
            teachers,
            dataset,
            top_k=self.top_k,
            tail=self.tail,
            dtype=self.dtype,
            precision=state.precision,
            teacher_dtype=teacher_dtype,
            input_key=input_key,
            logits_key=logits_key,
        )
        self.bind(fingerprint, len(dataset))
        return CachedFit(self, dataset.key if index_from_dataset else None)

    def _refuse_augmentation(self, dataset: Any, algorithms: Sequence[Any], state: Optional[State]) -> None:
        if self.allow_augmentation:
            return
        found = find_augmentation(dataset, algorithms, state)
        if found:
            raise ValueError(
                f'teacher_cache cannot be used with randomly augmented training data: {found}. Recorded teacher '
                'outputs belong to the inputs seen the first time; later epochs would pair other inputs with them. '
                'Remove the augmentation, or pass TeacherCache(allow_augmentation=True) to distil from the '
                "first epoch's outputs anyway."
            )

    # ---- before training ----------------------------------------------------------------------------------

    def precompute(
        self,
        teachers: Union[nn.Module, Sequence[nn.Module]],
        dataloader: Any,
        *,
        device: Optional[str] = None,
        precision: Union[str, Precision] = 'fp32',
        input_key: Optional[Key] = None,
        student_logits_key: Optional[Key] = None,
        teacher_logits_key: Optional[Key] = None,
    ) -> TeacherCache:
        """Record the teachers' (averaged) logits for every example ``dataloader`` yields, before training.

        The settings must be those the fit will use (``Trainer(precision=...)``, ``Distillation(input_key=...,
        student_logits_key=..., teacher_logits_key=...)``, and no ``teacher_inference`` dtype), or the fit refuses the
        cache as recorded for other settings. Examples already recorded are skipped. Teachers are run in eval mode
        without gradients and given back in the mode they had; they are moved to ``device``. With several processes,
        call it on every process: each records what its dataloader yields, then they share it (see :meth:`exchange`).

        Args:
            teachers (nn.Module | Sequence[nn.Module]): The teacher or teachers (as loaded; the fit must get the same
                weights).
            dataloader: Yields batches carrying example indices (an :class:`IndexedDataset`, or ``index_key``).
            device (str, optional): Composer device name (``'cpu'``, ``'gpu'``). Default: the GPU if there is one.
            precision (str | Precision, optional): As the trainer's. Default: ``'fp32'``.
            input_key (int | str | Callable, optional): As ``Distillation``'s. Default: ``None``.
            student_logits_key (int | str | Callable, optional): As ``Distillation``'s: without a
                ``teacher_logits_key``, teachers' outputs are read with it (a bare tensor output being the logits).
                Default: ``None``.
            teacher_logits_key (int | str | Callable, optional): As ``Distillation``'s. Default: ``None``.

        Returns:
            TeacherCache: ``self``.

        Example:
            .. testcode::

                import torch
                from torch.utils.data import DataLoader, TensorDataset
                from composer_kd import IndexedDataset, TeacherCache

                data = IndexedDataset(TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long)))
                cache = TeacherCache().precompute(torch.nn.Linear(4, 3), DataLoader(data, batch_size=4), device='cpu')
                assert cache.n_recorded == 10
        """
        teacher_list = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
        dataset = getattr(dataloader, 'dataset', None)
        if dataset is None or not hasattr(dataset, '__len__'):
            raise ValueError('precompute needs a DataLoader over a map-style dataset.')
        if self.index_key is None and not isinstance(dataset, IndexedDataset):
            raise ValueError(
                "precompute needs the examples' indices: wrap the dataset in IndexedDataset, or set index_key."
            )
        self._refuse_augmentation(dataset, (), None)
        composer_device = get_device(device)
        precision = Precision(precision)
        logits_key, bare_tensor_is_logits = resolve_teacher_logits_key(student_logits_key, teacher_logits_key)
        fingerprint = cache_fingerprint(
            teacher_list,
            dataset,
            top_k=self.top_k,
            tail=self.tail,
            dtype=self.dtype,
            precision=precision,
            input_key=input_key,
            logits_key=logits_key,
        )
        self.bind(fingerprint, len(dataset))
        frozen = FrozenTeachers(teacher_list)
        frozen.freeze()
        try:
            for teacher in teacher_list:
                composer_device.module_to_device(teacher)
            for batch in dataloader:
                if self.index_key is None:
                    batch, rows = detach_index(batch, dataset.key)
                else:
                    rows = torch.as_tensor(batch_get(batch, self.index_key)).reshape(-1)
                if self.contains(rows):
                    continue
                batch = composer_device.batch_to_device(batch)
                logits = teacher_logits(
                    teacher_list,
                    batch,
                    input_key=input_key,
                    logits_key=logits_key,
                    bare_tensor_is_logits=bare_tensor_is_logits,
                    precision=precision,
                )
                self.record(rows, logits)
        finally:
            frozen.restore()
        self.exchange(composer_device.tensor_to_device)
        self.flush()
        return self


class CachedFit:
    """A :class:`TeacherCache` during one fit: which examples each microbatch holds, and the fit's events.

    Made by :meth:`TeacherCache.start`; ``Distillation`` hands it the events in :attr:`EVENTS` and asks it for
    each microbatch's recorded logits. The example indices come from :class:`IndexedDataset` (taken off each batch
    before the student sees it and consumed microbatch by microbatch, as Composer splits batches into consecutive
    rows) or from the batch entry ``index_key``.

    Args:
        cache (TeacherCache): The bound cache.
        dataset_key (str, optional): The key :class:`IndexedDataset` stores indices under, or ``None`` when they
            are read from the cache's ``index_key``.
    """

    #: The events of a fit the cache acts on.
    EVENTS = frozenset(
        {Event.AFTER_DATALOADER, Event.BEFORE_TRAIN_BATCH, Event.AFTER_TRAIN_BATCH, Event.EPOCH_END, Event.FIT_END}
    )

    def __init__(self, cache: TeacherCache, dataset_key: Optional[str]):
        self.cache = cache
        self.dataset_key = dataset_key
        self._batch_index: Optional[torch.Tensor] = None
        self._consumed = 0

    def on_event(self, event: Event, state: State) -> None:
        """Act on one of :attr:`EVENTS`."""
        if event is Event.AFTER_DATALOADER:
            if self.dataset_key is not None:
                state.batch, index = detach_index(state.batch, self.dataset_key)
                self._batch_index = index.to('cpu', torch.long)
                self._consumed = 0
        elif event is Event.BEFORE_TRAIN_BATCH:
            self._consumed = 0  # Composer is about to (re)run the batch's microbatches from the first
        elif event is Event.AFTER_TRAIN_BATCH:
            self._check_batch_used()
        elif event is Event.EPOCH_END:
            self.cache.exchange(state.device.tensor_to_device)
        elif event is Event.FIT_END:
            self.cache.flush()

    def microbatch_rows(self, state: State, n_rows: int) -> torch.Tensor:
        """The dataset indices of the current microbatch, whose logits have ``n_rows`` rows."""
        if self.dataset_key is None:
            rows = batch_get(state.batch, self.cache.index_key)  # type: ignore[arg-type]
            rows = torch.as_tensor(rows).reshape(-1)
            if rows.numel() != n_rows:
                raise ValueError(
                    f'The batch entry index_key={self.cache.index_key!r} holds {rows.numel()} indices for a '
                    f'microbatch whose logits have {n_rows} rows.'
                )
            return rows.to('cpu', torch.long)
        if self._batch_index is None:
            raise RuntimeError('No example indices were taken from this batch (Event.AFTER_DATALOADER did not run).')
        start, self._consumed = self._consumed, self._consumed + n_rows
        if self._consumed > len(self._batch_index):
            raise ValueError(
                f'The microbatches of this batch have more rows ({self._consumed} so far) than the batch has example '
                f'indices ({len(self._batch_index)}): the teacher cache expects microbatches of consecutive rows, '
                'with logits of one row per example.'
            )
        return self._batch_index[start : self._consumed]

    def lookup(
        self, state: State, n_rows: int, device: Union[str, torch.device]
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The current microbatch's recorded logits on ``device`` (``None`` unless all are recorded), and its rows."""
        rows = self.microbatch_rows(state, n_rows)
        return self.cache.lookup(rows, device), rows

    def record(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Record the teachers' logits of ``rows`` (rows holding NaN or +inf are left out)."""
        self.cache.record(rows, logits)

    def _check_batch_used(self) -> None:
        """Check that the microbatches used every index of the batch (after they all ran)."""
        if self._batch_index is not None and self._consumed not in (0, len(self._batch_index)):
            raise ValueError(
                f"The microbatches used {self._consumed} of the batch's {len(self._batch_index)} example indices: "
                'the teacher cache expects microbatches of consecutive rows, with logits of one row per example.'
            )
