"""The losses between distributions and between raw logits: each a pure function and an ``nn.Module``."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from composer_kd.losses.base import (
    SoftenedLoss,
    check_shapes,
    distribution_loss,
    kl_terms,
    mean_over_positions,
)
from composer_kd.losses.chunked import chunked_kl_divergence

# Each loss between distributions, position by position: ``(log_p, log_q, dim) -> per-position value`` for the
# teacher's log-probabilities ``log_p`` and the student's ``log_q`` (before the ``T ** 2`` factor). The losses
# below and the fused output-layer path (:mod:`composer_kd.losses.fused`) share these, so both compute one formula.


def forward_kl_terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
    """KL(teacher || student) at each position: ``sum_c p_c (log p_c - log q_c)`` over ``dim``."""
    return kl_terms(log_p, log_q, dim)


def reverse_kl_terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
    """KL(student || teacher) at each position: ``sum_c q_c (log q_c - log p_c)`` over ``dim``."""
    return kl_terms(log_q, log_p, dim)


def jensen_shannon_terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
    """The Jensen-Shannon divergence at each position: ``KL(p || m) / 2 + KL(q || m) / 2``, ``m = (p + q) / 2``."""
    # Classes both give zero probability are kept out of logaddexp, whose gradient there is nan; they
    # contribute nothing either way.
    dead = torch.isneginf(log_p) & torch.isneginf(log_q)
    log_m = torch.logaddexp(torch.where(dead, 0.0, log_p), torch.where(dead, 0.0, log_q)) - math.log(2.0)
    return 0.5 * kl_terms(log_p, log_m, dim) + 0.5 * kl_terms(log_q, log_m, dim)


def soft_cross_entropy_terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
    """The cross-entropy against the teacher at each position: ``-sum_c p_c log q_c`` over ``dim``."""
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_q, 0.0)).sum(dim=dim)


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Forward KL, KL(teacher || student), between temperature-softened distributions, times ``T ** 2``.

    With :math:`p = \mathrm{softmax}(t / T)` and :math:`q = \mathrm{softmax}(s / T)` over ``softmax_dim``, each
    position contributes :math:`T^2 \sum_c p_c (\log p_c - \log q_c)`. The student is pushed to cover every
    class the teacher gives weight to (mass-covering); this is the loss of Hinton et al. (2015).

    Args:
        student_logits (torch.Tensor): Student logits, any shape.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean, the logits' shape without ``softmax_dim``; only positions where
            it is true count. Default: ``None``, every position.

    Returns:
        torch.Tensor: A float32 scalar; zero when no position is valid.

    Example:
        .. testcode::

            import torch
            from composer_kd import kl_divergence

            loss = kl_divergence(torch.randn(8, 10), torch.randn(8, 10), temperature=4.0)
    """
    return distribution_loss(forward_kl_terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


def reverse_kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Reverse KL, KL(student || teacher), times ``T ** 2``: :math:`T^2 \sum_c q_c (\log q_c - \log p_c)`.

    Mode-seeking: the student may ignore teacher modes it cannot represent, which suits small students of
    generative models (e.g. MiniLLM).

    Args:
        student_logits (torch.Tensor): Student logits, any shape.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean, the logits' shape without ``softmax_dim``. Default: ``None``.

    Returns:
        torch.Tensor: A float32 scalar; zero when no position is valid.

    Example:
        .. testcode::

            import torch
            from composer_kd import reverse_kl_divergence

            loss = reverse_kl_divergence(torch.randn(8, 10), torch.randn(8, 10), temperature=2.0)
    """

    return distribution_loss(reverse_kl_terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


def jensen_shannon_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Jensen-Shannon divergence times ``T ** 2``.

    Each position contributes :math:`T^2 (\tfrac12 KL(p\|m) + \tfrac12 KL(q\|m))` with :math:`m = (p+q)/2`.
    Symmetric and bounded by :math:`T^2 \log 2`.

    Args:
        student_logits (torch.Tensor): Student logits, any shape.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean, the logits' shape without ``softmax_dim``. Default: ``None``.

    Returns:
        torch.Tensor: A float32 scalar; zero when no position is valid.

    Example:
        .. testcode::

            import torch
            from composer_kd import jensen_shannon_divergence

            loss = jensen_shannon_divergence(torch.randn(8, 10), torch.randn(8, 10))
    """

    return distribution_loss(jensen_shannon_terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Cross-entropy against the teacher's softened distribution, times ``T ** 2``: :math:`-T^2 \sum_c p_c \log q_c`.

    It equals :func:`kl_divergence` plus the teacher's entropy, a constant for the student, so the gradients
    are the same; the value is what AutoMM-style ``soft_label`` losses report (there without the ``T ** 2``:
    divide by it to compare).

    Args:
        student_logits (torch.Tensor): Student logits, any shape.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean, the logits' shape without ``softmax_dim``. Default: ``None``.

    Returns:
        torch.Tensor: A float32 scalar; zero when no position is valid.

    Example:
        .. testcode::

            import torch
            from composer_kd import soft_cross_entropy

            loss = soft_cross_entropy(torch.randn(8, 10), torch.randn(8, 10), temperature=2.0)
    """

    return distribution_loss(soft_cross_entropy_terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


def logits_mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean squared error between logits (or features): the squared difference averaged over every element.

    Without a mask this equals ``torch.nn.functional.mse_loss(student, teacher)``. With a mask over the leading
    dimensions, it averages over the selected positions' elements.

    Args:
        student (torch.Tensor): Student values.
        teacher (torch.Tensor): Teacher values, the same shape.
        mask (torch.Tensor, optional): Boolean, the inputs' shape without the last dimension.

    Returns:
        torch.Tensor: A float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import logits_mse

            loss = logits_mse(torch.randn(8, 10), torch.randn(8, 10))
    """
    check_shapes(student, teacher)
    per_position = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    return mean_over_positions(per_position, mask)


def cosine_distance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``1 - cos(student, teacher)`` along the last dimension, averaged over positions.

    Insensitive to the features' scale: it matches directions only, which suits hidden states whose norms
    differ between teacher and student.

    Args:
        student (torch.Tensor): Student features ``[..., dim]``.
        teacher (torch.Tensor): Teacher features, the same shape.
        mask (torch.Tensor, optional): Boolean, the inputs' shape without the last dimension.
        eps (float, optional): Guards against zero norms. Default: ``1e-8``.

    Returns:
        torch.Tensor: A float32 scalar in ``[0, 2]``.

    Example:
        .. testcode::

            import torch
            from composer_kd import cosine_distance

            loss = cosine_distance(torch.randn(4, 6, 32), torch.randn(4, 6, 32))
    """
    check_shapes(student, teacher)
    per_position = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=eps)
    return mean_over_positions(per_position, mask)


class KLDivergence(SoftenedLoss):
    """The knowledge-distillation loss of Hinton et al. (2015) as a module; see :func:`kl_divergence`.

    Args:
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``4.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        chunk_size (int | str, optional): Compute it ``chunk_size`` positions at a time (see
            :func:`chunked_kl_divergence`; ``'auto'`` sizes chunks by the vocabulary), for token-level logits with
            large vocabularies. Needs ``softmax_dim=-1``. Default: ``None``, all at once.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None)`` gives: a float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import KLDivergence

            loss_fn = KLDivergence(temperature=2.0)
            loss = loss_fn(torch.randn(8, 10), torch.randn(8, 10))
    """

    _fn = staticmethod(kl_divergence)

    def __init__(self, temperature: float = 4.0, softmax_dim: int = -1, chunk_size: Optional[Union[int, str]] = None):
        super().__init__(temperature, softmax_dim)
        if chunk_size is not None and softmax_dim != -1:
            raise ValueError('KLDivergence(chunk_size=...) needs softmax_dim=-1.')
        valid = chunk_size in (None, 'auto') or (isinstance(chunk_size, int) and chunk_size > 0)
        if not valid:
            raise ValueError(f"chunk_size must be a positive integer or 'auto', got {chunk_size!r}.")
        self.chunk_size = chunk_size

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.chunk_size is None:
            return super().forward(student_logits, teacher_logits, mask)
        chunk_size = None if self.chunk_size == 'auto' else self.chunk_size
        return chunked_kl_divergence(student_logits, teacher_logits, self.temperature, mask, chunk_size)

    def extra_repr(self) -> str:
        chunks = '' if self.chunk_size is None else f', chunk_size={self.chunk_size}'
        return super().extra_repr() + chunks


class ReverseKLDivergence(SoftenedLoss):
    """:func:`reverse_kl_divergence` as a module.

    Args:
        temperature (float, optional): Softening temperature, ``> 0``; a schedule may change it during a fit.
            Default: ``4.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None)`` gives: a float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import ReverseKLDivergence

            loss = ReverseKLDivergence(temperature=1.0)(torch.randn(8, 10), torch.randn(8, 10))
    """

    _fn = staticmethod(reverse_kl_divergence)


class JensenShannonDivergence(SoftenedLoss):
    """:func:`jensen_shannon_divergence` as a module.

    Args:
        temperature (float, optional): Softening temperature, ``> 0``; a schedule may change it during a fit.
            Default: ``4.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None)`` gives: a float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import JensenShannonDivergence

            loss = JensenShannonDivergence(temperature=1.0)(torch.randn(8, 10), torch.randn(8, 10))
    """

    _fn = staticmethod(jensen_shannon_divergence)


class SoftCrossEntropy(SoftenedLoss):
    """:func:`soft_cross_entropy` as a module.

    Args:
        temperature (float, optional): Softening temperature, ``> 0``; a schedule may change it during a fit.
            Default: ``4.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None)`` gives: a float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import SoftCrossEntropy

            loss = SoftCrossEntropy(temperature=2.0)(torch.randn(8, 10), torch.randn(8, 10))
    """

    _fn = staticmethod(soft_cross_entropy)


class LogitsMSE(nn.Module):
    """:func:`logits_mse` as a module (no temperature: it compares raw values).

    Returns:
        torch.Tensor: What calling ``loss_fn(student, teacher, mask=None)`` gives: a float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import LogitsMSE

            loss = LogitsMSE()(torch.randn(8, 10), torch.randn(8, 10))
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None):
        return logits_mse(student, teacher, mask)


class CosineDistance(nn.Module):
    """:func:`cosine_distance` as a module.

    Returns:
        torch.Tensor: What calling ``loss_fn(student, teacher, mask=None)`` gives: a float32 scalar in ``[0, 2]``.

    Example:
        .. testcode::

            import torch
            from composer_kd import CosineDistance

            loss = CosineDistance()(torch.randn(8, 32), torch.randn(8, 32))
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None):
        return cosine_distance(student, teacher, mask)
