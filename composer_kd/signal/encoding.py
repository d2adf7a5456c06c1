"""Encoding of an offline teacher signal: each position's top-k logits in a low precision, their vocabulary indices
bit-packed, and the log of the probability mass left outside the top k.

Everything here works on plain tensors and NumPy bytes, so that the shard format (:mod:`composer_kd.signal.shards`)
and the loss (:mod:`composer_kd.losses.signal`) can be tested without Streaming. The top-k selection itself is the
teacher cache's (:func:`composer_kd.cache.topk.topk_compress`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from composer_kd.cache.topk import topk_compress

__all__ = [
    'VALUE_DTYPES',
    'EncodedSignal',
    'bits_per_index',
    'bytes_per_token',
    'decode_signal',
    'encode_signal',
    'encode_topk',
    'pack_indices',
    'unpack_indices',
]

# The stored precision of the kept logits; both take two bytes. bfloat16 has float32's range (no overflow for any
# logit), float16 three more bits of mantissa (finer values for logits within +-65504).
VALUE_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def bits_per_index(vocab_size: int) -> int:
    """``ceil(log2(vocab_size))``: the bits one vocabulary index takes once packed (at least 1).

    Example:
        .. testcode::

            from composer_kd.signal.encoding import bits_per_index

            assert bits_per_index(30522) == 15 and bits_per_index(50257) == 16 and bits_per_index(2) == 1
    """
    if not (isinstance(vocab_size, int) and vocab_size >= 2):
        raise ValueError(f'vocab_size must be an integer >= 2, got {vocab_size!r}.')
    return max(1, math.ceil(math.log2(vocab_size)))


def bytes_per_token(k: int, vocab_size: int) -> float:
    """Bytes the signal of one position takes in a shard: ``k`` two-byte logits, ``k`` packed indices, a float32
    log tail mass (the token id itself and the shard's per-sample overhead not counted).

    Example:
        .. testcode::

            from composer_kd.signal.encoding import bytes_per_token

            assert bytes_per_token(8, 32000) == 8 * 2 + 8 * 15 / 8 + 4
    """
    return k * 2 + k * bits_per_index(vocab_size) / 8 + 4


def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers below ``2**bits`` into ``ceil(n * bits / 8)`` bytes, least significant bit first.

    Args:
        indices (np.ndarray): Integers of any shape (flattened in C order).
        bits (int): Bits per integer, 1 to 32.

    Returns:
        bytes: The packed bits.

    Example:
        .. testcode::

            import numpy as np
            from composer_kd.signal.encoding import pack_indices, unpack_indices

            packed = pack_indices(np.array([5, 0, 7, 3]), bits=3)
            assert len(packed) == 2 and unpack_indices(packed, 4, bits=3).tolist() == [5, 0, 7, 3]
    """
    if not 1 <= bits <= 32:
        raise ValueError(f'bits must lie between 1 and 32, got {bits}.')
    flat = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f'indices must lie in [0, 2**{bits}), got values from {flat.min()} to {flat.max()}.')
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder='little').tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> np.ndarray:
    """The ``count`` integers :func:`pack_indices` packed, as a flat int64 array."""
    needed = math.ceil(count * bits / 8)
    if len(data) < needed:
        raise ValueError(f'{count} indices of {bits} bits need {needed} bytes, got {len(data)}.')
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder='little')
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    return planes.reshape(count, bits).astype(np.int64) @ weights


@dataclass(frozen=True)
class EncodedSignal:
    """The signal of ``n`` positions as it is stored.

    Attributes:
        values (bytes): ``n * k`` kept logits in ``value_dtype``, largest first at each position.
        indices (bytes): Their ``n * k`` vocabulary indices, :func:`pack_indices` at ``bits_per_index(vocab_size)``.
        log_tail (np.ndarray): ``[n]`` float32, ``logsumexp`` of the ``vocab_size - k`` other logits.
        positions (int): ``n``.
        k (int): Logits kept per position.
        vocab_size (int): ``V``.
        value_dtype (str): ``'float16'`` or ``'bfloat16'``.
    """

    values: bytes
    indices: bytes
    log_tail: np.ndarray
    positions: int
    k: int
    vocab_size: int
    value_dtype: str


def check_k(k: int, vocab_size: int, name: str = 'k') -> None:
    """Refuse a ``k`` that is not an integer in ``[1, vocab_size - 1]``, naming it."""
    if not (isinstance(k, int) and not isinstance(k, bool) and 0 < k < vocab_size):
        raise ValueError(
            f'{name}={k!r} must be an integer between 1 and the vocabulary size minus one ({vocab_size - 1}): the '
            'signal keeps the k largest logits and the mass of the others.'
        )


def encode_signal(logits: torch.Tensor, k: int, value_dtype: str = 'float16') -> EncodedSignal:
    """Encode teacher logits ``[n, V]`` (one row per position) for storage.

    Args:
        logits (torch.Tensor): ``[n, V]`` teacher logits at temperature 1.
        k (int): Logits kept per position, ``1 <= k < V``.
        value_dtype (str, optional): Precision the kept logits are stored in: ``'float16'`` or ``'bfloat16'``.
            Default: ``'float16'``.

    Returns:
        EncodedSignal: The stored form; :func:`decode_signal` gives back exactly what it holds.

    Example:
        .. testcode::

            import torch
            from composer_kd.signal.encoding import decode_signal, encode_signal

            logits = torch.randn(6, 100)
            values, indices, log_tail = decode_signal(encode_signal(logits, k=4))
            assert torch.equal(indices, logits.topk(4).indices)
            assert torch.equal(values, logits.topk(4).values.half().float())
    """
    if logits.ndim != 2:
        raise ValueError(f'logits must be [positions, vocabulary], got shape {tuple(logits.shape)}.')
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f'value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}.')
    n, vocab = logits.shape
    check_k(k, vocab)
    values, indices, log_tail = topk_compress(logits.detach().float(), k)
    return encode_topk(values.to(VALUE_DTYPES[value_dtype]), indices, log_tail, vocab, value_dtype)


def encode_topk(
    values: torch.Tensor, indices: torch.Tensor, log_tail: torch.Tensor, vocab_size: int, value_dtype: str = 'float16'
) -> EncodedSignal:
    """Encode ``n`` positions' top-k already selected (:func:`~composer_kd.cache.topk.topk_compress` on the
    teacher's device) for storage: what :func:`encode_signal` does once the ``[n, V]`` logits are reduced.

    Args:
        values (torch.Tensor): ``[n, k]`` kept logits, largest first (cast to ``value_dtype`` here if not yet).
        indices (torch.Tensor): ``[n, k]`` their vocabulary indices.
        log_tail (torch.Tensor): ``[n]`` log mass of the other ``vocab_size - k`` logits.
        vocab_size (int): ``V``.
        value_dtype (str, optional): ``'float16'`` or ``'bfloat16'``. Default: ``'float16'``.

    Returns:
        EncodedSignal: The stored form.
    """
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f'value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}.')
    n, k = values.shape
    stored = values.to(VALUE_DTYPES[value_dtype]).cpu().contiguous().view(torch.int16).numpy()
    return EncodedSignal(
        values=stored.tobytes(),
        indices=pack_indices(indices.cpu().numpy(), bits_per_index(vocab_size)),
        log_tail=log_tail.cpu().numpy().astype(np.float32),
        positions=n,
        k=k,
        vocab_size=vocab_size,
        value_dtype=value_dtype,
    )


def decode_signal(signal: EncodedSignal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored signal as tensors: ``values [n, k]`` float32 (exactly the stored low-precision numbers),
    ``indices [n, k]`` int64 and ``log_tail [n]`` float32."""
    n, k = signal.positions, signal.k
    raw = torch.from_numpy(np.frombuffer(signal.values, dtype=np.int16, count=n * k).copy())
    values = raw.view(VALUE_DTYPES[signal.value_dtype]).float().reshape(n, k)
    indices = torch.from_numpy(unpack_indices(signal.indices, n * k, bits_per_index(signal.vocab_size)))
    log_tail = torch.from_numpy(np.asarray(signal.log_tail, dtype=np.float32).reshape(n).copy())
    return values, indices.reshape(n, k), log_tail
