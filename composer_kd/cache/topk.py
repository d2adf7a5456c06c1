"""Top-k encoding of teacher logits: keep the ``k`` largest per position, and rebuild dense logits from them."""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ['topk_compress', 'topk_logits']


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
