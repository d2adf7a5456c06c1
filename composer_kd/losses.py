"""Distillation losses: pure functions on tensors, and ``nn.Module`` forms usable as ``kd_loss_fn``.

Every function compares ``student`` with ``teacher`` position by position (a position is everything but the
class dimension) and averages over positions, or over the positions where ``mask`` is true. Losses between
distributions soften both with a temperature ``T``, work in float32 log space (large logits cannot overflow,
``-inf`` entries give no NaN) and are multiplied by ``T ** 2``, which keeps their gradients' magnitude
independent of ``T`` (Hinton et al., 2015), so a loss weight need not be re-tuned when ``T`` changes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'LOSSES',
    'CosineDistance',
    'JensenShannonDivergence',
    'KLDivergence',
    'LogitsMSE',
    'ReverseKLDivergence',
    'SoftCrossEntropy',
    'chunked_kl_divergence',
    'cosine_distance',
    'get_loss',
    'jensen_shannon_divergence',
    'kl_divergence',
    'logits_mse',
    'reverse_kl_divergence',
    'soft_cross_entropy',
]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature!r}.')


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
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


def _softened_log_probs(logits: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=dim)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_c p_c (log p_c - log q_c)`` over ``dim``; entries with ``p_c == 0`` count 0 (0 log 0 = 0)."""
    p = log_p.exp()
    # Zero the log-ratio itself where p == 0: -inf - (-inf) is nan, and even a torch.where around the product
    # would let it back in through the product's gradient (0 * nan).
    log_ratio = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * log_ratio).sum(dim=dim)


def _distribution_loss(
    per_position_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    softmax_dim: int,
    mask: Optional[torch.Tensor],
) -> torch.Tensor:
    _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits)
    log_q = _softened_log_probs(student_logits, temperature, softmax_dim)
    log_p = _softened_log_probs(teacher_logits, temperature, softmax_dim)
    return mean_over_positions(per_position_fn(log_p, log_q, softmax_dim) * temperature**2, mask)


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
    return _distribution_loss(_kl_terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


# Elements per chunk when the caller does not choose: each float32 temporary then takes 16 MiB, small next to
# the logits of a language model yet large enough that per-chunk overhead stays negligible.
_CHUNK_ELEMENTS = 2**22


class _ChunkedKL(torch.autograd.Function):
    """Forward KL over rows ``[N, V]``, computed a chunk of rows at a time, its gradient with it.

    Each chunk's softmax copies exist only while that chunk is processed. The gradient, which has a closed form
    (``T * (softmax(s/T) - softmax(t/T))`` per row, times the row's weight), is written in the same pass, so the
    backward pass neither keeps nor recomputes a softmax: it only scales that buffer by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, row_weights, temperature: float, chunk_size: int):
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            log_q = _softened_log_probs(student[rows], temperature, -1)
            log_p = _softened_log_probs(teacher[rows], temperature, -1)
            # In-place steps keep three chunk-sized float32 temporaries alive at most.
            p = log_p.exp()
            log_ratio = log_p.sub_(log_q).masked_fill_(p == 0, 0.0)  # 0 log 0 = 0, as in kl_divergence
            total += (row_weights[rows] * torch.linalg.vecdot(p, log_ratio)).sum()
            if needs_grad:
                # d/ds of T^2 * KL(p || softmax(s/T)) is T * (q - p), q = softmax(s/T).
                q = log_q.exp_()
                grad[rows] = q.sub_(p).mul_(row_weights[rows, None] * temperature).to(grad.dtype)
        ctx.grad = grad
        ctx.consumed = False
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError('chunked_kl_divergence supports one backward pass per forward pass.')
        # The buffer is scaled in place: a second copy of the logits' size is what chunking exists to avoid.
        grad, ctx.grad, ctx.consumed = ctx.grad, None, True
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None


def chunked_kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """:func:`kl_divergence` over the last dimension, in chunks of ``chunk_size`` positions.

    The same value and gradients, but the ``[positions, vocabulary]`` float32 softmax copies are never all alive
    at once: for language models with large vocabularies they, not the logits, dominate the loss's memory. Only
    the student's logits receive a gradient (the teacher's are constants, as in distillation).

    Args:
        student_logits (torch.Tensor): Student logits ``[..., vocab]``.
        teacher_logits (torch.Tensor): Teacher logits, the same shape.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.
        mask (torch.Tensor, optional): Boolean, the logits' shape without the last dimension.
        chunk_size (int, optional): Positions per chunk. Default: ``None``, as many as keep each float32
            temporary near 16 MiB (``2**22`` elements: 131 positions of a 32000-word vocabulary).

    Returns:
        torch.Tensor: A float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import chunked_kl_divergence, kl_divergence

            s, t = torch.randn(2, 64, 100), torch.randn(2, 64, 100)
            assert torch.allclose(chunked_kl_divergence(s, t, 2.0, chunk_size=16), kl_divergence(s, t, 2.0))
    """
    _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // vocab)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f'chunk_size must be a positive integer, got {chunk_size!r}.')
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if mask is None:
        row_weights = torch.full((student.shape[0],), 1.0 / student.shape[0], device=student.device)
    else:
        mask = mask.to(device=student.device, dtype=torch.bool)
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f'mask {tuple(mask.shape)} must have the logits shape without the class dimension, '
                f'{tuple(student_logits.shape[:-1])}.'
            )
        flat = mask.reshape(-1).float()
        row_weights = flat / flat.sum().clamp(min=1)
    return _ChunkedKL.apply(student, teacher.detach(), row_weights, float(temperature), chunk_size)


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

    def terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        return _kl_terms(log_q, log_p, dim)

    return _distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


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

    def terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        # Classes both give zero probability are kept out of logaddexp, whose gradient there is nan; they
        # contribute nothing either way.
        dead = torch.isneginf(log_p) & torch.isneginf(log_q)
        log_m = torch.logaddexp(torch.where(dead, 0.0, log_p), torch.where(dead, 0.0, log_q)) - math.log(2.0)
        return 0.5 * _kl_terms(log_p, log_m, dim) + 0.5 * _kl_terms(log_q, log_m, dim)

    return _distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


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

    def terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        p = log_p.exp()
        return -(p * torch.where(p > 0, log_q, 0.0)).sum(dim=dim)

    return _distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


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
    _check_shapes(student, teacher)
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
    _check_shapes(student, teacher)
    per_position = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=eps)
    return mean_over_positions(per_position, mask)


class _SoftenedLoss(nn.Module):
    """A loss between softened distributions, holding its temperature (which a schedule may change)."""

    _fn: Callable[..., torch.Tensor]

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
        return type(self)._fn(student_logits, teacher_logits, self.temperature, self.softmax_dim, mask)

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}, softmax_dim={self.softmax_dim}'


class KLDivergence(_SoftenedLoss):
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


class ReverseKLDivergence(_SoftenedLoss):
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


class JensenShannonDivergence(_SoftenedLoss):
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


class SoftCrossEntropy(_SoftenedLoss):
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


#: Every loss by the name recipes use for it.
LOSSES: dict[str, type[nn.Module]] = {
    'kl': KLDivergence,
    'reverse_kl': ReverseKLDivergence,
    'js': JensenShannonDivergence,
    'soft_ce': SoftCrossEntropy,
    'mse': LogitsMSE,
    'cosine': CosineDistance,
}


def get_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name (``'kl'``, ``'reverse_kl'``, ``'js'``, ``'soft_ce'``, ``'mse'``, ``'cosine'``, ``'dkd'``).

    AutoMM's names are accepted too: ``'mean_square_error'`` is ``'mse'`` and ``'cosine_distance'`` is
    ``'cosine'``. ``standardize=True`` wraps the loss in :class:`Standardized` (logit standardization).

    Args:
        name (str): The loss's name.
        **kwargs: Its arguments, e.g. ``temperature=2.0`` (``alpha``, ``beta`` for ``'dkd'``), and
            ``standardize`` (bool, default ``False``).

    Returns:
        nn.Module: The loss.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).

    Example:
        .. testcode::

            from composer_kd import get_loss

            loss_fn = get_loss('js', temperature=2.0)
            standardized_kd = get_loss('kl', temperature=2.0, standardize=True)
    """
    standardize = kwargs.pop('standardize', False)
    aliases = LOSS_ALIASES
    key = aliases.get(name, name)
    if key not in LOSSES:
        raise ValueError(f'Unknown loss {name!r}; known: {sorted(LOSSES)} (and AutoMM aliases {sorted(aliases)}).')
    loss = LOSSES[key](**kwargs)
    return Standardized(loss) if standardize else loss


#: AutoMM's names for some of :data:`LOSSES`, accepted wherever a loss is named: ``{alias: name in LOSSES}``.
LOSS_ALIASES: dict[str, str] = {'mean_square_error': 'mse', 'cosine_distance': 'cosine', 'kl_divergence': 'kl'}


def canonical_loss_name(name: str) -> Optional[str]:
    """The key of :data:`LOSSES` that ``name`` stands for: itself, or the loss an alias names; ``None`` if unknown.

    Args:
        name (str): A loss name or one of :data:`LOSS_ALIASES`.

    Returns:
        str | None: The name in :data:`LOSSES`, or ``None`` for a name that is neither.

    Example:
        .. testcode::

            from composer_kd.losses import canonical_loss_name

            assert canonical_loss_name('mean_square_error') == 'mse'
            assert canonical_loss_name('kl') == 'kl' and canonical_loss_name('hinge') is None
    """
    key = LOSS_ALIASES.get(name, name)
    return key if key in LOSSES else None


def loss_from_name(name: str, temperature: Optional[float] = None, **options: Any) -> nn.Module:
    """The loss ``name`` names, at ``temperature`` when it is a loss that takes one.

    ``logits_mse`` and ``cosine_distance`` compare raw values, so a temperature is not passed to them; this is how
    a recipe's ``distillation.temperature`` and ``distill(temperature=...)`` apply to any named loss.

    Args:
        name (str): A name of :data:`LOSSES` or one of :data:`LOSS_ALIASES`.
        temperature (float, optional): The softening temperature. Default: ``None``, the loss's own.
        **options: Further arguments of the loss (``alpha``, ``beta`` for ``'dkd'``) and ``standardize``, as
            :func:`get_loss` takes them.

    Returns:
        nn.Module: The loss.

    Raises:
        ValueError: For an unknown name, as :func:`get_loss` does.

    Example:
        .. testcode::

            from composer_kd.losses import KLDivergence, LogitsMSE, loss_from_name

            assert loss_from_name('kl_divergence', temperature=2.0).temperature == 2.0
            assert isinstance(loss_from_name('mse', temperature=2.0), LogitsMSE)
            assert loss_from_name('dkd', temperature=2.0, beta=4.0).temperature == 2.0
    """
    key = canonical_loss_name(name)
    softened = key is not None and 'temperature' in inspect.signature(LOSSES[key]).parameters
    return get_loss(name, **options, **({'temperature': temperature} if softened and temperature is not None else {}))


#: The label of an example whose label is hidden: losses and metrics skip it, distillation still uses it.
IGNORE_INDEX = -100


def cross_entropy_with_hidden_labels(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over examples whose label is known (not ``IGNORE_INDEX``); 0 when none is.

    ``torch.nn.functional.cross_entropy`` would return NaN for a batch without a single label, which happens
    when a few labelled examples are mixed with many unlabelled ones. Dense targets (e.g. after Composer's
    ``LabelSmoothing``) go to Composer's ``soft_cross_entropy``.

    Args:
        logits (torch.Tensor): ``[batch, classes]`` logits.
        targets (torch.Tensor): ``[batch]`` class indices, ``IGNORE_INDEX`` where hidden; or ``[batch, classes]``
            class probabilities.

    Returns:
        torch.Tensor: The mean cross-entropy over the known labels, a scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd.losses import IGNORE_INDEX, cross_entropy_with_hidden_labels

            logits = torch.zeros(2, 3)
            assert cross_entropy_with_hidden_labels(logits, torch.tensor([IGNORE_INDEX, IGNORE_INDEX])) == 0
    """
    if targets.ndim == logits.ndim:
        # Imported here because this module's own soft_cross_entropy (a distillation loss) holds the name.
        from composer.loss import soft_cross_entropy as composer_soft_cross_entropy

        return composer_soft_cross_entropy(logits, targets)
    known = targets != IGNORE_INDEX
    per_example = F.cross_entropy(logits, targets.clamp(min=0), reduction='none')
    return (per_example * known).sum() / known.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# Divergences for distilling generative models on sequences (on-policy distillation): the beta-generalized
# Jensen-Shannon divergence (GKD) and the skew KL divergences (DistiLLM).
# ---------------------------------------------------------------------------------------------------------------


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
    _check_unit_interval('beta', beta, True, '0: forward KL, 1: reverse KL')
    if beta == 0:
        return kl_divergence(student_logits, teacher_logits, temperature, softmax_dim, mask)
    if beta == 1:
        return reverse_kl_divergence(student_logits, teacher_logits, temperature, softmax_dim, mask)

    def terms(log_p: torch.Tensor, log_q: torch.Tensor, dim: int) -> torch.Tensor:
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl_terms(log_p, log_m, dim) + (1.0 - beta) * _kl_terms(log_q, log_m, dim)

    return _distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


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
        return _kl_terms(log_p, _log_mixture(log_p, log_q, alpha), dim)

    return _distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


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
        return _kl_terms(log_q, _log_mixture(log_q, log_p, alpha), dim)

    return _distribution_loss(terms, student_logits, teacher_logits, temperature, softmax_dim, mask)


class _MixtureLoss(_SoftenedLoss):
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


LOSSES.update({'gjsd': GeneralizedJSD, 'skew_kl': SkewKLDivergence, 'skew_reverse_kl': SkewReverseKLDivergence})
__all__ += [
    'GeneralizedJSD',
    'SkewKLDivergence',
    'SkewReverseKLDivergence',
    'generalized_jsd',
    'skew_kl_divergence',
    'skew_reverse_kl_divergence',
]

__all__ += [
    'IGNORE_INDEX',
    'LOSS_ALIASES',
    'canonical_loss_name',
    'cross_entropy_with_hidden_labels',
    'loss_from_name',
]


# ---------------------------------------------------------------------------------------------------------------
# Decoupled knowledge distillation and logit standardization.
# ---------------------------------------------------------------------------------------------------------------


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
        _check_shapes(student_logits, teacher_logits)
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
    tckd = _kl_terms(log_b_teacher, log_b_student, -1)
    # The distributions over the non-target classes: the softmax with the target class removed.
    nckd = _kl_terms(t_rest - t_rest_lse.unsqueeze(-1), s_rest - s_rest_lse.unsqueeze(-1), -1)
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
    _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits)
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
        _check_temperature(temperature)
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


LOSSES['dkd'] = DecoupledKD
__all__ += ['DecoupledKD', 'Standardized', 'decoupled_kd', 'standardize_logits']
