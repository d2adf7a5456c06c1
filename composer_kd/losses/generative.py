"""Divergences for distilling generative models on sequences (on-policy distillation): the beta-generalized
Jensen-Shannon divergence (GKD) and the skew KL divergences (DistiLLM)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

from composer_kd.losses.base import (
    SoftenedLoss,
    distribution_loss,
    kl_terms,
)
from composer_kd.losses.divergences import (
    forward_kl_terms,
    kl_divergence,
    reverse_kl_divergence,
    reverse_kl_terms,
)


def _check_unit_interval(name: str, value: float, upper_inclusive: bool, meaning: str) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    valid = valid and 0.0 <= value and (value <= 1.0 if upper_inclusive else value < 1.0)
    if not valid:
        interval = '[0, 1]' if upper_inclusive else '[0, 1)'
        raise ValueError(f'{name} must be a number in {interval} ({meaning}), got {value!r}.')


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)`` from log-probabilities, for ``0 < weight_a < 1``.

    Classes both give zero probability are kept out of ``logaddexp``, whose gradient there is NaN; no term
    reads the mixture where both are zero.
    """
    dead = torch.isneginf(log_a) & torch.isneginf(log_b)
    log_a = torch.where(dead, 0.0, log_a) + math.log(weight_a)
    log_b = torch.where(dead, 0.0, log_b) + math.log(1.0 - weight_a)
    return torch.logaddexp(log_a, log_b)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The :math:`\beta`-generalized Jensen-Shannon divergence of Generalized Knowledge Distillation, times ``T ** 2``.

    With the teacher's :math:`p = \mathrm{softmax}(t / T)`, the student's :math:`q = \mathrm{softmax}(s / T)` and
    their mixture :math:`m = \beta p + (1 - \beta) q`, each position contributes

    .. math:: T^2 \left(\beta\, KL(p \,\|\, m) + (1 - \beta)\, KL(q \,\|\, m)\right)

    for :math:`0 < \beta < 1` (:math:`\beta = 0.5` is :func:`jensen_shannon_divergence`). The endpoints follow the
    convention of Agarwal et al. (2024) and of Hugging Face TRL's ``generalized_jsd_loss``: :math:`\beta = 0` is
    the forward KL, :math:`KL(p \| q)` (:func:`kl_divergence`), and :math:`\beta = 1` the reverse KL,
    :math:`KL(q \| p)` (:func:`reverse_kl_divergence`). They are the limits of the divergence divided by
    :math:`\beta` and by :math:`1 - \beta` respectively; the formula above itself goes to 0 at both ends, so its
    scale shrinks near them. Small :math:`\beta` behaves like the mass-covering forward KL, large :math:`\beta`
    like the mode-seeking reverse KL.

    Without the ``T ** 2`` factor (or at ``T = 1``) the value is TRL's with ``reduction='batchmean'`` over the
    same valid positions.

    Args:
        student_logits (torch.Tensor): Student logits, any shape.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        beta (float, optional): The teacher's weight in the mixture, in ``[0, 1]``. Default: ``0.5``.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean, the logits' shape without ``softmax_dim``; only positions where
            it is true count. Default: ``None``, every position.

    Returns:
        torch.Tensor: A float32 scalar; zero when no position is valid.

    Raises:
        ValueError: For ``beta`` outside ``[0, 1]``.

    Example:
        .. testcode::

            import torch
            from composer_kd import generalized_jsd, jensen_shannon_divergence, kl_divergence

            s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
            assert torch.allclose(generalized_jsd(s, t, beta=0.0), kl_divergence(s, t))
            assert torch.allclose(generalized_jsd(s, t, beta=0.5), jensen_shannon_divergence(s, t))
    """
    terms = generalized_jsd_terms(beta)
    return distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


def generalized_jsd_terms(beta: float) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The per-position terms of :func:`generalized_jsd` at ``beta``: ``(log_p, log_q, dim) -> [positions]``.

    ``beta = 0`` gives the forward KL's terms and ``beta = 1`` the reverse KL's, as :func:`generalized_jsd` does.

    Example:
        .. testcode::

            import torch
            from composer_kd.losses.divergences import forward_kl_terms
            from composer_kd.losses.generative import generalized_jsd_terms

            log_p, log_q = torch.randn(3, 7).log_softmax(-1), torch.randn(3, 7).log_softmax(-1)
            assert torch.equal(generalized_jsd_terms(0.0)(log_p, log_q, -1), forward_kl_terms(log_p, log_q, -1))
    """
    _check_unit_interval('beta', beta, True, '0: forward KL, 1: reverse KL')
    if beta == 0:
        return forward_kl_terms
    if beta == 1:
        return reverse_kl_terms

    def terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * kl_terms(log_p, log_m, dim) + (1.0 - beta) * kl_terms(log_q, log_m, dim)

    return terms


def skew_kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Skew KL divergence (DistiLLM, Ko et al., 2024), times ``T ** 2``.

    Each position contributes :math:`T^2 KL(p \,\|\, \alpha p + (1 - \alpha) q)`: the forward KL from the
    teacher :math:`p` to a mixture that keeps a share :math:`\alpha` of the teacher in the student :math:`q`. The
    mixture never gives a class the teacher favours a vanishing probability, which bounds the loss by
    :math:`T^2 \log(1/\alpha)` and keeps its gradient from exploding where the student is far off. ``alpha=0``
    is :func:`kl_divergence`.

    Args:
        student_logits (torch.Tensor): Student logits, any shape.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        alpha (float, optional): The teacher's share of the mixture, in ``[0, 1)``. Default: ``0.1``, DistiLLM's.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean, the logits' shape without ``softmax_dim``. Default: ``None``.

    Returns:
        torch.Tensor: A float32 scalar; zero when no position is valid.

    Raises:
        ValueError: For ``alpha`` outside ``[0, 1)``.

    Example:
        .. testcode::

            import torch
            from composer_kd import kl_divergence, skew_kl_divergence

            s, t = torch.randn(4, 9), torch.randn(4, 9)
            assert torch.allclose(skew_kl_divergence(s, t, alpha=0.0), kl_divergence(s, t))
            assert skew_kl_divergence(s, t, alpha=0.1) <= torch.log(torch.tensor(10.0))
    """
    _check_unit_interval('alpha', alpha, False, "the teacher's share of the mixture; 0: forward KL")
    if alpha == 0:
        return kl_divergence(student_logits, teacher_logits, temperature, softmax_dim, mask)

    def terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        return kl_terms(log_p, _log_mixture(log_p, log_q, alpha), dim)

    return distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


def skew_reverse_kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Skew reverse KL divergence (DistiLLM), times ``T ** 2``: :math:`T^2 KL(q \,\|\, \alpha q + (1 - \alpha) p)`.

    The reverse KL from the student :math:`q` to a mixture that keeps a share :math:`\alpha` of the student in
    the teacher :math:`p`; bounded by :math:`T^2 \log(1/\alpha)`. ``alpha=0`` is :func:`reverse_kl_divergence`.

    Args:
        student_logits (torch.Tensor): Student logits, any shape.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        alpha (float, optional): The student's share of the mixture, in ``[0, 1)``. Default: ``0.1``, DistiLLM's.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean, the logits' shape without ``softmax_dim``. Default: ``None``.

    Returns:
        torch.Tensor: A float32 scalar; zero when no position is valid.

    Raises:
        ValueError: For ``alpha`` outside ``[0, 1)``.

    Example:
        .. testcode::

            import torch
            from composer_kd import reverse_kl_divergence, skew_reverse_kl_divergence

            s, t = torch.randn(4, 9), torch.randn(4, 9)
            assert torch.allclose(skew_reverse_kl_divergence(s, t, alpha=0.0), reverse_kl_divergence(s, t))
    """
    _check_unit_interval('alpha', alpha, False, "the student's share of the mixture; 0: reverse KL")
    if alpha == 0:
        return reverse_kl_divergence(student_logits, teacher_logits, temperature, softmax_dim, mask)

    def terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        return kl_terms(log_q, _log_mixture(log_q, log_p, alpha), dim)

    return distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


class _MixtureLoss(SoftenedLoss):
    """A softened loss with one more parameter, the mixing weight (``beta`` or ``alpha``)."""

    _weight_name: str

    def __init__(self, weight: float, temperature: float, softmax_dim: int):
        super().__init__(temperature, softmax_dim)
        self._check_weight(weight)
        setattr(self, self._weight_name, float(weight))

    @staticmethod
    def _check_weight(weight: float) -> None:
        raise NotImplementedError

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        weight = getattr(self, self._weight_name)
        return type(self)._fn(student_logits, teacher_logits, weight, self.temperature, self.softmax_dim, mask)

    def extra_repr(self) -> str:
        return f'{self._weight_name}={getattr(self, self._weight_name)}, {super().extra_repr()}'


class GeneralizedJSD(_MixtureLoss):
    """:func:`generalized_jsd` as a module: GKD's divergence, usable as ``kd_loss_fn``.

    Args:
        beta (float, optional): The teacher's weight in the mixture, in ``[0, 1]``: ``0`` is the forward KL,
            ``1`` the reverse KL, ``0.5`` the Jensen-Shannon divergence. Default: ``0.5``.
        temperature (float, optional): Softening temperature, ``> 0``; a schedule may change it during a fit.
            Default: ``1.0``, as language models are distilled.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None)`` gives: a float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import GeneralizedJSD

            loss_fn = GeneralizedJSD(beta=0.9)
            loss = loss_fn(torch.randn(2, 6, 50), torch.randn(2, 6, 50), mask=torch.ones(2, 6, dtype=torch.bool))
    """

    _fn = staticmethod(generalized_jsd)
    _weight_name = 'beta'

    @staticmethod
    def _check_weight(weight: float) -> None:
        _check_unit_interval('beta', weight, True, '0: forward KL, 1: reverse KL')

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, softmax_dim: int = -1):
        super().__init__(beta, temperature, softmax_dim)


class SkewKLDivergence(_MixtureLoss):
    """:func:`skew_kl_divergence` as a module.

    Args:
        alpha (float, optional): The teacher's share of the mixture, in ``[0, 1)``. Default: ``0.1``.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None)`` gives: a float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import SkewKLDivergence

            loss = SkewKLDivergence(alpha=0.1)(torch.randn(8, 10), torch.randn(8, 10))
    """

    _fn = staticmethod(skew_kl_divergence)
    _weight_name = 'alpha'

    @staticmethod
    def _check_weight(weight: float) -> None:
        _check_unit_interval('alpha', weight, False, "the teacher's share of the mixture; 0: forward KL")

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, softmax_dim: int = -1):
        super().__init__(alpha, temperature, softmax_dim)


class SkewReverseKLDivergence(_MixtureLoss):
    """:func:`skew_reverse_kl_divergence` as a module.

    Args:
        alpha (float, optional): The student's share of the mixture, in ``[0, 1)``. Default: ``0.1``.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None)`` gives: a float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import SkewReverseKLDivergence

            loss = SkewReverseKLDivergence(alpha=0.1)(torch.randn(8, 10), torch.randn(8, 10))
    """

    _fn = staticmethod(skew_reverse_kl_divergence)
    _weight_name = 'alpha'

    @staticmethod
    def _check_weight(weight: float) -> None:
        _check_unit_interval('alpha', weight, False, "the student's share of the mixture; 0: reverse KL")

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, softmax_dim: int = -1):
        super().__init__(alpha, temperature, softmax_dim)
