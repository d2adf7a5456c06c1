"""How much room a model takes on disk."""

from __future__ import annotations

import io

import torch
from torch import nn

__all__ = ['model_size_bytes']


def model_size_bytes(model: nn.Module) -> int:
    """The size in bytes of ``torch.save(model.state_dict())``: what saving the model's weights writes to disk.

    For an int8 model this counts the packed int8 weights with their scales and zero points; for a pruned one
    still holding masks, ``weight_orig`` and ``weight_mask`` (export it first with
    :func:`~composer_kd.compression.make_pruning_permanent`). The file format adds a roughly constant overhead
    per tensor, which dominates for very small models.

    Args:
        model (nn.Module): Any module.

    Returns:
        int: Bytes.

    Example:
        .. testcode::

            import torch
            from composer_kd.compression import model_size_bytes

            assert model_size_bytes(torch.nn.Linear(256, 256)) > 256 * 257 * 4
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
