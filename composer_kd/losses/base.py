"""What every loss between logits shares: argument checks, softened log-probabilities, KL terms, the mean
over valid positions, and the module form holding a temperature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature!r}.')


def check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f'student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape.')


def mean_over_positions(per_position: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The mean of a per-position loss over the positions ``mask`` keeps (all without a mask; 0 if none is kept).

    No host synchronization: an empty mask divides by one instead of branching on its count.

    Args:
        per_position (torch.Tensor): The loss at each position (example or token).
        mask (torch.Tensor, optional): Boolean, the shape of ``per_position``.

    Returns:
        torch.Tensor: A scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd.losses import mean_over_positions

            loss = mean_over_positions(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([True, False, True]))
            assert loss.item() == 3.5
    """
    if mask is None:
        return per_position.mean()
    mask = mask.to(device=per_position.device, dtype=torch.bool)
    if mask.shape != per_position.shape:
        raise ValueError(
            f'mask {tuple(mask.shape)} must have the shape of the inputs without the class dimension, '
            f'{tuple(per_position.shape)}.'
        )
    kept = torch.where(mask, per_position, 0.0)
    return kept.sum() / mask.sum().clamp(min=1)


def softened_log_probs(logits: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=dim)


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_c p_c (log p_c - log q_c)`` over ``dim``; entries with ``p_c == 0`` count 0 (0 log 0 = 0)."""
    p = log_p.exp()
    # Zero the log-ratio itself where p == 0: -inf - (-inf) is nan, and even a torch.where around the product
    # would let it back in through the product's gradient (0 * nan).
    log_ratio = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * log_ratio).sum(dim=dim)


def distribution_loss(
    per_position_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    softmax_dim: int,
    mask: Optional[torch.Tensor],
) -> torch.Tensor:
    check_temperature(temperature)
    check_shapes(student_logits, teacher_logits)
    log_q = softened_log_probs(student_logits, temperature, softmax_dim)
    log_p = softened_log_probs(teacher_logits, temperature, softmax_dim)
    return mean_over_positions(per_position_fn(log_p, log_q, softmax_dim) * temperature**2, mask)


class SoftenedLoss(nn.Module):
    """A loss between softened distributions, holding its temperature (which a schedule may change)."""

    _fn: Callable[..., torch.Tensor]

    def __init__(self, temperature: float = 4.0, softmax_dim: int = -1):
        super().__init__()
        check_temperature(temperature)
        self.temperature = float(temperature)
        self.softmax_dim = softmax_dim

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return type(self)._fn(student_logits, teacher_logits, self.temperature, self.softmax_dim, mask)

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}, softmax_dim={self.softmax_dim}'
