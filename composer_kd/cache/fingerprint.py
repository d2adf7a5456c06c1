"""The fingerprint: what recorded teacher outputs depend on, so that outputs recorded for another fit are refused.

:func:`cache_fingerprint` hashes the teachers' weights and a sample of the dataset's examples and lists the
settings that change the outputs (top-k, dtype, precision, keys, the files' format). :func:`differences` names
each field in which two fingerprints differ, for the message of a :class:`.StaleTeacherCacheError`.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from composer.core import Precision
from torch import nn

from composer_kd.cache.indices import unwrap_indexed
from composer_kd.cache.storage import FORMAT_VERSION
from composer_kd.models.outputs import Key
from composer_kd.models.sharding import unsharded_class

__all__ = ['cache_fingerprint', 'differences', 'hash_teacher']

# How many examples the fingerprint reads.
_SAMPLED_EXAMPLES = 16


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


def hash_teacher(teacher: nn.Module) -> str:
    """A BLAKE2 hash of ``teacher``'s class and every tensor of its ``state_dict``, in name order; a teacher sharded
    by FSDP (version 2) hashes as the whole teacher, and every rank holding a shard must call this; a teacher
    dispatched with a device map hashes its offloaded weights where they are kept."""
    from torch.distributed.tensor import DTensor

    h = hashlib.blake2b(digest_size=16)
    h.update(unsharded_class(teacher).__qualname__.encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        if isinstance(tensor, torch.Tensor):
            h.update(name.encode())
            if isinstance(tensor, DTensor):  # a sharded teacher hashes as the whole one, each tensor gathered in turn
                tensor = tensor.full_tensor()
            elif tensor.is_meta:  # offloaded by a device map: read from where it is kept, one tensor at a time
                tensor = _offloaded_tensor(teacher, name)
            _hash_tensor(h, tensor)
    return h.hexdigest()


def _offloaded_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The weight ``name`` of a model dispatched with a device map (Accelerate), which keeps offloaded weights on the
    meta device and loads them from its hooks' weights map for each forward pass."""
    module_name, _, attribute = name.rpartition('.')
    module = model.get_submodule(module_name)
    weights = getattr(getattr(module, '_hf_hook', None), 'weights_map', None)
    if weights is None:
        raise ValueError(
            f'The teacher holds {name!r} on the meta device, with no device map that keeps its weights elsewhere: '
            'load its weights before using it.'
        )
    return weights[attribute]


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

    Args:
        teachers (Sequence[nn.Module]): The teachers whose (averaged) logits are recorded.
        dataset: The training dataset (an :class:`.IndexedDataset` is looked through).
        top_k (int, optional): As the cache's. Default: ``None``.
        tail (str, optional): As the cache's; recorded only with ``top_k``. Default: ``None``.
        dtype (torch.dtype, optional): The cache's storage dtype. Default: ``torch.float32``.
        precision (str | Precision, optional): The trainer's precision. Default: ``'fp32'``.
        teacher_dtype (torch.dtype, optional): The dtype the teachers run in, if cast. Default: ``None``.
        input_key (int | str | Callable, optional): As ``Distillation``'s. Default: ``None``.
        logits_key (int | str | Callable, optional): The key the teachers' logits are read with. Default: ``None``.

    Returns:
        dict[str, Any]: The fingerprint.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache import cache_fingerprint

            teacher = torch.nn.Linear(3, 2)
            data = [torch.zeros(3), torch.ones(3)]
            assert cache_fingerprint([teacher], data) == cache_fingerprint([teacher], data)
            assert cache_fingerprint([teacher], data) != cache_fingerprint([teacher], data[:1])
    """
    dataset = unwrap_indexed(dataset)
    return {
        'format': FORMAT_VERSION,
        'teachers': [f'{type(t).__qualname__}:{hash_teacher(t)}' for t in teachers],
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


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Each field in which two fingerprints differ, as ``'<field>: recorded <stored>, now <current>'``, sorted.

    Args:
        stored (Mapping[str, Any]): The fingerprint the outputs were recorded under.
        current (Mapping[str, Any]): The fingerprint of the fit at hand.

    Returns:
        list[str]: One line per differing field (a field missing on one side counts as ``None`` there); empty
        when they match.

    Example:
        .. testcode::

            from composer_kd.cache.fingerprint import differences

            assert differences({'top_k': 8, 'dtype': 'float32'}, {'top_k': 4, 'dtype': 'float32'}) == [
                'top_k: recorded 8, now 4'
            ]
    """
    return [
        f'{key}: recorded {stored.get(key)!r}, now {current.get(key)!r}'
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]
