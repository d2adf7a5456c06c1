"""Distillation losses: a functional core plus ``nn.Module`` wrappers usable as ``kd_loss_fn``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['KLDivergence', 'kl_divergence']


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature!r}.')


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""KL(teacher || student) between temperature-softened distributions, scaled by ``temperature ** 2``.

    With :math:`p = \mathrm{softmax}(t / T)` and :math:`q = \mathrm{softmax}(s / T)` taken over ``softmax_dim``,
    each position contributes :math:`T^2 \sum_c p_c (\log p_c - \log q_c)`; the result is the mean over all
    positions (every dimension but ``softmax_dim``), or over the positions where ``mask`` is true.

    The ``T ** 2`` factor keeps the gradient's magnitude independent of the temperature (Hinton et al., 2015),
    so the weight given to this term need not be re-tuned when the temperature changes.

    Everything is computed in float32 log space: large logits cannot overflow, and classes that the teacher
    masks with ``-inf`` contribute exactly zero instead of ``0 * inf = nan``.

    Args:
        student_logits (torch.Tensor): Student logits, any shape.
        teacher_logits (torch.Tensor): Teacher logits, the same shape as ``student_logits``.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean tensor of the logits' shape without ``softmax_dim``; only the
            positions where it is true count. Default: ``None`` (every position counts).

    Returns:
        torch.Tensor: A scalar; zero when no position is valid.

    Example:
        .. testcode::

            import torch
            from composer_kd import kl_divergence

            student, teacher = torch.randn(8, 10), torch.randn(8, 10)
            loss = kl_divergence(student, teacher, temperature=4.0)
    """
    _check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f'student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} '
            'must have the same shape.'
        )
    log_q = F.log_softmax(student_logits.float() / temperature, dim=softmax_dim)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=softmax_dim)
    p = log_p.exp()
    # Where p == 0 the term is 0 by the convention 0 * log 0 = 0; torch.where keeps the -inf - (-inf) = nan
    # of such entries out of both the value and the gradient.
    pointwise = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    per_position = pointwise.sum(dim=softmax_dim) * temperature**2
    if mask is None:
        return per_position.mean()
    mask = mask.to(device=per_position.device, dtype=torch.bool)
    if mask.shape != per_position.shape:
        raise ValueError(
            f'mask {tuple(mask.shape)} must have the logits shape without the class dimension, '
            f'{tuple(per_position.shape)}.'
        )
    n_valid = mask.sum()
    return torch.where(mask, per_position, torch.zeros_like(per_position)).sum() / n_valid.clamp(min=1)


class KLDivergence(nn.Module):
    """The knowledge-distillation loss of Hinton et al. (2015) as a module; see :func:`kl_divergence`.

    Args:
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``4.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.

    Example:
        .. testcode::

            import torch
            from composer_kd import KLDivergence

            loss_fn = KLDivergence(temperature=2.0)
            loss = loss_fn(torch.randn(8, 10), torch.randn(8, 10))
    """

    def __init__(self, temperature: float = 4.0, softmax_dim: int = -1):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = float(temperature)
        self.softmax_dim = softmax_dim

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return kl_divergence(student_logits, teacher_logits, self.temperature, self.softmax_dim, mask)

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}, softmax_dim={self.softmax_dim}'
