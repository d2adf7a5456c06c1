"""Decoupled knowledge distillation (Zhao et al., 2022) and logit standardization (Sun et al., 2024)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from composer_kd.losses.base import (
    check_shapes,
    check_temperature,
    kl_terms,
    mean_over_positions,
)
from composer_kd.losses.labels import IGNORE_INDEX


def standardize_logits(logits: torch.Tensor, dim: int = -1, eps: float = 1e-7) -> torch.Tensor:
    r"""Z-score each logit vector along ``dim``: :math:`(z - \bar z) / \max(\sigma(z), \epsilon)`, in float32.

    :math:`\bar z = \frac1K \sum_k z_k` and :math:`\sigma(z) = \sqrt{\frac1K \sum_k (z_k - \bar z)^2}` over the
    :math:`K` classes, as Sun et al. (2024) define them (their released code divides by :math:`K - 1`, a constant
    factor :math:`\sqrt{K / (K - 1)}` of the temperature). ``-inf`` entries (masked classes) stay ``-inf`` and are
    left out of the mean and the deviation; a vector with one finite entry, or constant, becomes zeros there.

    Args:
        logits (torch.Tensor): Logits, any shape.
        dim (int, optional): The class dimension. Default: ``-1``.
        eps (float, optional): The smallest deviation divided by, so that a constant vector gives zeros.
            Default: ``1e-7``.

    Returns:
        torch.Tensor: Float32, the shape of ``logits``: mean 0 and deviation 1 along ``dim`` over finite entries.

    Example:
        .. testcode::

            import torch
            from composer_kd import standardize_logits

            z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0, float('-inf')]]))
            assert torch.allclose(z[0, :3], torch.tensor([-1.2247449, 0.0, 1.2247449]))
            assert z[0, 3] == float('-inf')
    """
    x = logits.float()
    finite = torch.isfinite(x)
    count = finite.sum(dim=dim, keepdim=True).clamp(min=1)
    # Non-finite entries are replaced before any arithmetic, so that no inf or nan enters a gradient through
    # the branch torch.where discards.
    x0 = torch.where(finite, x, 0.0)
    mean = x0.sum(dim=dim, keepdim=True) / count
    centered = torch.where(finite, x0 - mean, 0.0)
    # max(std, eps) rather than std + eps: the same for any non-constant vector, and the square root is never
    # taken at 0, where its gradient is infinite.
    std = (centered.square().sum(dim=dim, keepdim=True) / count).clamp(min=eps**2).sqrt()
    return torch.where(finite, centered / std, x)


def _takes_argument(fn: Callable, name: str) -> bool:
    """Whether the loss ``fn`` (a module: its ``forward``) accepts the argument ``name``."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class Standardized(nn.Module):
    r"""Logit standardization (Sun et al., CVPR 2024) in front of any distillation loss.

    Both the student's and the teacher's logits are z-scored per position (:func:`standardize_logits`) before
    they reach ``loss``, so the student matches the teacher's *relations* between classes, not the range of its
    logits. The paper's convention on temperature is kept: the loss's temperature divides the standardized
    logits, :math:`\mathrm{softmax}(Z(z) / \tau)` with :math:`\tau` the paper's "base temperature", and the
    ``T ** 2`` factor of the wrapped loss stays (as in the paper's code). With ``KLDivergence`` the loss is

    .. math:: \tau^2\, \mathrm{KL}\big(\mathrm{softmax}(Z(t)/\tau) \,\|\, \mathrm{softmax}(Z(s)/\tau)\big).

    Standardized logits have unit deviation, so useful temperatures are smaller than on raw logits (the paper
    used 2 or 3, and a distillation weight of 9 against a label weight of 0.1, on CIFAR-100). ``get_loss(name,
    standardize=True)`` builds the same. ``mask`` and ``labels`` are passed on to the wrapped loss when it takes
    them; ``temperature`` reads and sets the wrapped loss's (so ``Distillation(temperature=...)`` schedules work).

    Args:
        loss (Callable): A loss ``(student_logits, teacher_logits, ...) -> scalar``, e.g. ``KLDivergence(2.0)``
            or :class:`DecoupledKD`. Its class dimension must be the last.
        eps (float, optional): See :func:`standardize_logits`. Default: ``1e-7``.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None, labels=None)`` gives:
        the wrapped loss on the standardized logits.

    Example:
        .. testcode::

            import torch
            from composer_kd import KLDivergence, Standardized, kl_divergence, standardize_logits

            s, t = torch.randn(8, 10), 5 * torch.randn(8, 10)
            loss = Standardized(KLDivergence(temperature=2.0))(s, t)
            assert torch.allclose(loss, kl_divergence(standardize_logits(s), standardize_logits(t), 2.0))
    """

    def __init__(self, loss: Callable[..., torch.Tensor], eps: float = 1e-7):
        super().__init__()
        if isinstance(loss, Standardized):
            raise ValueError('The loss is already Standardized.')
        if not callable(loss):
            raise TypeError(f'loss must be callable, got {type(loss).__name__}.')
        if getattr(loss, 'softmax_dim', -1) != -1:
            raise ValueError('Standardized needs a loss whose class dimension is the last (softmax_dim=-1).')
        self.loss = loss
        self.eps = float(eps)
        self._takes_mask = _takes_argument(loss, 'mask')
        self._takes_labels = _takes_argument(loss, 'labels')

    @property
    def temperature(self) -> float:
        """The wrapped loss's temperature."""
        if not hasattr(self.loss, 'temperature'):
            raise AttributeError(f'{type(self.loss).__name__} has no temperature.')
        return self.loss.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not hasattr(self.loss, 'temperature'):
            raise AttributeError(f'{type(self.loss).__name__} has no temperature to set.')
        self.loss.temperature = value

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        check_shapes(student_logits, teacher_logits)
        student, teacher = (
            standardize_logits(student_logits, eps=self.eps),
            standardize_logits(teacher_logits, eps=self.eps),
        )
        kwargs = {}
        if self._takes_labels:
            kwargs['labels'] = labels
        if mask is not None and not self._takes_mask:
            mask = mask.to(device=student.device, dtype=torch.bool)
            student, teacher = student[mask], teacher[mask]
            if 'labels' in kwargs and labels is not None:
                kwargs['labels'] = labels.to(mask.device)[mask]
        elif self._takes_mask:
            kwargs['mask'] = mask
        return self.loss(student, teacher, **kwargs)

    def extra_repr(self) -> str:
        return f'eps={self.eps:g}'


def _decoupled_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position ``(TCKD, NCKD)`` of logits ``[..., K]`` and labels ``[...]`` (valid classes), unscaled by T."""
    target = F.one_hot(labels, student_logits.shape[-1]).bool()
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    # log p_t and log(1 - p_t) from log-sum-exps: exact where 1 - p_t would round to 0 in probability space.
    s_all, t_all = torch.logsumexp(s, dim=-1), torch.logsumexp(t, dim=-1)
    s_rest, t_rest = s.masked_fill(target, -math.inf), t.masked_fill(target, -math.inf)
    s_rest_lse, t_rest_lse = torch.logsumexp(s_rest, dim=-1), torch.logsumexp(t_rest, dim=-1)
    s_target = s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    t_target = t.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    log_b_student = torch.stack([s_target - s_all, s_rest_lse - s_all], dim=-1)
    log_b_teacher = torch.stack([t_target - t_all, t_rest_lse - t_all], dim=-1)
    tckd = kl_terms(log_b_teacher, log_b_student, -1)
    # The distributions over the non-target classes: the softmax with the target class removed.
    nckd = kl_terms(t_rest - t_rest_lse.unsqueeze(-1), s_rest - s_rest_lse.unsqueeze(-1), -1)
    return tckd, nckd


def decoupled_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    softmax_dim: int = -1,
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""Decoupled knowledge distillation (Zhao et al., CVPR 2022): target and non-target terms weighted apart.

    With :math:`p = \mathrm{softmax}(t / T)`, :math:`q = \mathrm{softmax}(s / T)` and :math:`y` the position's
    label, each position contributes :math:`T^2 (\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD})`, where

    * :math:`\mathrm{TCKD} = \mathrm{KL}(b^p \| b^q)` between the binary distributions
      :math:`b = (p_y,\ 1 - p_y)`: how sure of the target class each model is;
    * :math:`\mathrm{NCKD} = \mathrm{KL}(\hat p \| \hat q)` between the distributions over the non-target classes,
      :math:`\hat p_j = p_j / (1 - p_y)` for :math:`j \ne y`: the teacher's "dark knowledge".

    Hinton's KD is the special case :math:`\mathrm{KD} = \mathrm{TCKD} + (1 - p_y)\,\mathrm{NCKD}`: the weight of
    the non-target term shrinks exactly where the teacher is confident, which DKD undoes by weighting it with a
    constant :math:`\beta`. The paper used :math:`\alpha = 1`, :math:`T = 4` and :math:`\beta = 8` on CIFAR-100
    (0.5 on ImageNet), with the labels' cross-entropy at weight 1 and the DKD term ramped up linearly over the
    first 20 epochs (a :class:`~composer_kd.LinearSchedule` on ``kd_loss_weight`` does that).

    Everything is computed in float32 log space: :math:`\log(1 - p_y)` is a log-sum-exp over the other classes,
    exact even where :math:`p_y` rounds to 1.

    Args:
        student_logits (torch.Tensor): Student logits, at least 2 classes along ``softmax_dim``.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        labels (torch.Tensor): Integer class indices, the logits' shape without ``softmax_dim`` (e.g. ``[B]`` for
            ``[B, K]`` logits, ``[B, S]`` for token logits ``[B, S, V]``); positions labelled ``ignore_index``
            do not count.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        alpha (float, optional): Weight of the target-class term. Default: ``1.0``.
        beta (float, optional): Weight of the non-target-class term. Default: ``8.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        mask (torch.Tensor, optional): Boolean, the labels' shape; only positions where it is true count.
        ignore_index (int, optional): The label of positions without a target. Default: ``-100``.

    Returns:
        torch.Tensor: A float32 scalar, the mean over counted positions; zero when none counts.

    Raises:
        ValueError: If the shapes do not fit, there are fewer than 2 classes, or the labels are not integers.

    Example:
        .. testcode::

            import torch
            from composer_kd import decoupled_kd, kl_divergence

            s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
            loss = decoupled_kd(s, t, y, temperature=4.0, alpha=1.0, beta=8.0)
            # Ignored positions (-100) do not count:
            y[4:] = -100
            assert torch.isclose(decoupled_kd(s, t, y, 4.0), decoupled_kd(s[:4], t[:4], y[:4], 4.0))
    """
    check_temperature(temperature)
    check_shapes(student_logits, teacher_logits)
    student, teacher = student_logits.movedim(softmax_dim, -1), teacher_logits.movedim(softmax_dim, -1)
    if student.shape[-1] < 2:
        raise ValueError(f'decoupled_kd needs at least 2 classes, got {student.shape[-1]}.')
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f'labels must be an integer tensor of class indices, got {kind}.')
    if labels.shape != student.shape[:-1]:
        raise ValueError(
            f'labels {tuple(labels.shape)} must have the logits shape without the class dimension, '
            f'{tuple(student.shape[:-1])}.'
        )
    labels = labels.to(student.device)
    valid = labels != ignore_index
    if mask is not None:
        mask = mask.to(device=student.device, dtype=torch.bool)
        if mask.shape != labels.shape:
            raise ValueError(f'mask {tuple(mask.shape)} must have the shape of the labels, {tuple(labels.shape)}.')
        valid = valid & mask
    # Ignored positions get class 0 for the computation, then weight 0.
    tckd, nckd = _decoupled_terms(student, teacher, torch.where(valid, labels, 0).long(), temperature)
    return mean_over_positions((alpha * tckd + beta * nckd) * temperature**2, valid)


class DecoupledKD(nn.Module):
    """:func:`decoupled_kd` as a module: ``DecoupledKD(temperature, alpha, beta)``, registered as ``'dkd'``.

    It needs each position's target class. ``Distillation`` passes the batch's labels to a loss whose ``forward``
    takes ``labels`` (detected when the fit starts, as ``mask`` is): the targets of ``(inputs, targets)``
    batches, ``batch['labels']`` of dict batches (shifted by one token for causal language models), or the
    task's labels (``batch[student_logits_key]``) of multi-task batches. Called by hand, pass ``labels=``.
    Positions without a label (``ignore_index``, e.g. the unlabelled images of a transfer set) get no term at all:
    where the teacher's answers on unlabelled inputs are the point, use a loss without labels (the KL).

    Args:
        temperature (float, optional): Softening temperature, ``> 0``; a schedule may change it. Default: ``4.0``.
        alpha (float, optional): Weight of the target-class term. Default: ``1.0``.
        beta (float, optional): Weight of the non-target-class term. Default: ``8.0``.
        softmax_dim (int, optional): The class dimension. Default: ``-1``.
        ignore_index (int, optional): The label of positions without a target. Default: ``-100``.

    Returns:
        torch.Tensor: What calling ``loss_fn(student_logits, teacher_logits, mask=None, labels=...)`` gives: a
        float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import DecoupledKD

            loss_fn = DecoupledKD(temperature=4.0, alpha=1.0, beta=8.0)
            loss = loss_fn(torch.randn(8, 10), torch.randn(8, 10), labels=torch.randint(0, 10, (8,)))
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        softmax_dim: int = -1,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        check_temperature(temperature)
        for name, value in (('alpha', alpha), ('beta', beta)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f'{name} must be a number >= 0, got {value!r}.')
        self.temperature = float(temperature)
        self.alpha, self.beta = float(alpha), float(beta)
        self.softmax_dim = softmax_dim
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                'DecoupledKD needs the target class of every position: pass labels= (class indices, the logits '
                'shape without the class dimension). Distillation finds them in (inputs, targets) batches, in '
                "batch['labels'] and in a multi-task batch's entry for the task; this batch has none of these."
            )
        return decoupled_kd(
            student_logits,
            teacher_logits,
            labels,
            self.temperature,
            self.alpha,
            self.beta,
            self.softmax_dim,
            mask,
            self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, softmax_dim={self.softmax_dim}'
