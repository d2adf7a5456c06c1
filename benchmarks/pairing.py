"""Checking that students compared with one another start from the same weights and see the same batches.

A comparison of a student trained alone with one distilled says something about distillation only if nothing else
differs: the same initial weights and the same batches in the same order. :class:`PairingRecord` is a Composer
callback that records a digest of the model's weights when the fit starts and of every training batch as it starts;
:func:`check_pairing` compares the records of several fits and raises, naming the first fit and batch that differ.

A digest is a BLAKE2 hash of each tensor's name, dtype, shape and bytes, so two digests are equal only when every
tensor is equal bit for bit (short of a hash collision).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from composer import Callback, Logger, State


def digest(tensors: Any, keys: Optional[Iterable[str]] = None) -> str:
    """A hash of every tensor in ``tensors`` (a tensor, a mapping or a sequence of them, nested), in a fixed order.

    Args:
        tensors: A tensor, or a mapping or sequence holding tensors (other values are hashed by their ``repr``).
        keys (Iterable[str], optional): For a mapping at the top, hash only these keys (each must be there).
            Default: every key.

    Returns:
        str: The hexadecimal digest.
    """
    if keys is not None:
        if not isinstance(tensors, Mapping):
            raise TypeError(f'keys={list(keys)} given for a {type(tensors).__name__}, not a mapping.')
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise KeyError(f'keys {missing} are not in the batch (its keys: {sorted(tensors)}).')
        tensors = {key: tensors[key] for key in keys}
    hasher = hashlib.blake2b(digest_size=16)
    _update(hasher, '', tensors)
    return hasher.hexdigest()


def _update(hasher: Any, name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
        # Through uint8, which every dtype (bfloat16 included) can be viewed as.
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            _update(hasher, f'{name}.{key}', value[key])
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _update(hasher, f'{name}[{i}]', item)
    else:
        hasher.update(f'{name}={value!r}|'.encode())


class PairingRecord(Callback):
    """Records a digest of the model's weights at ``FIT_START`` and one of each training batch at ``BATCH_START``.

    Args:
        batch_keys (Iterable[str], optional): For mapping batches, the keys whose tensors are compared (for example
            the token ids and labels, leaving out a teacher signal that differs by design). Default: every key.
    """

    def __init__(self, batch_keys: Optional[Iterable[str]] = None):
        self.batch_keys = None if batch_keys is None else tuple(batch_keys)
        self.weights: Optional[str] = None
        self.batches: list[str] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        # At FIT_START the algorithms have run their own FIT_START (callbacks come after them), but no optimizer
        # step has been taken: these are the weights the first batch trains.
        self.weights = digest(state.model.state_dict())

    def batch_start(self, state: State, logger: Logger) -> None:
        self.batches.append(digest(state.batch, self.batch_keys))


def check_pairing(records: Mapping[str, PairingRecord]) -> dict[str, Any]:
    """Raise unless every fit of ``records`` started from the same weights and saw the same batches in the same order.

    Args:
        records (Mapping[str, PairingRecord]): One record per fit, by the fit's name.

    Returns:
        dict: ``weights`` (the common weights digest), ``batches`` (how many) and ``batch_order`` (a digest of the
        batch digests in order), the same for every fit.

    Raises:
        ValueError: If fewer than two records are given, or a record saw no fit or no batch.
        AssertionError: Naming the first fit whose weights, number of batches or batch differs from the first's.
    """
    if len(records) < 2:
        raise ValueError(f'records: give at least two fits to compare, got {list(records)}.')
    (first, reference), *others = records.items()
    for name, record in records.items():
        if record.weights is None or not record.batches:
            raise ValueError(f'records[{name!r}] saw no fit or no batch: was it passed to the Trainer as a callback?')
    for name, record in others:
        if record.weights != reference.weights:
            raise AssertionError(f'{name!r} did not start from the weights {first!r} started from.')
        if len(record.batches) != len(reference.batches):
            raise AssertionError(f'{name!r} saw {len(record.batches)} batches, {first!r} saw {len(reference.batches)}.')
        for i, (ours, theirs) in enumerate(zip(reference.batches, record.batches, strict=True)):
            if ours != theirs:
                raise AssertionError(f'batch {i} of {name!r} differs from batch {i} of {first!r}.')
    return {
        'weights': reference.weights,
        'batches': len(reference.batches),
        'batch_order': hashlib.blake2b(''.join(reference.batches).encode(), digest_size=16).hexdigest(),
    }
