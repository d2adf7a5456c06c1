r"""The distillation term from a stored teacher signal, with no ``[positions, vocabulary]`` teacher tensor.

The approximation of the teacher's distribution
-----------------------------------------------
A position's signal holds the teacher's ``k`` largest logits :math:`z_i` (``i`` in the kept set :math:`K`) and
:math:`\tau = \log \sum_{j \notin K} e^{z_j}`, the log of the mass of the other :math:`V - k` classes (before
normalization). The teacher is taken to give each dropped class the same logit
:math:`c = \tau - \log(V - k)`: the kept logits are exact, and the dropped classes share their total mass evenly.
At temperature 1 this reproduces every kept probability and the total dropped mass exactly (it is the
distribution :func:`composer_kd.cache.topk.topk_logits` rebuilds). At a temperature :math:`T \ne 1` the rebuilt
logits are divided by :math:`T` like any logits (``z_i / T`` for kept classes, ``c / T`` for the others): the
dropped mass at :math:`T` is then that of :math:`V - k` equal logits, an approximation of the teacher's.

With :math:`p = \mathrm{softmax}(\tilde z / T)` (rebuilt) and :math:`q = \mathrm{softmax}(s / T)` (student), every
dropped class has the same :math:`p_c = p_\mathrm{tail}`, so

.. math::

    \mathrm{KL}(p \| q) = \sum_{i \in K} p_i (\log p_i - \log q_i)
        + (V - k)\, p_\mathrm{tail} \log p_\mathrm{tail}
        - p_\mathrm{tail} \Big(\sum_{c=1}^{V} \log q_c - \sum_{i \in K} \log q_i\Big),

which needs the student's full log-probabilities only through their sum and their values at the kept classes.
As :func:`~composer_kd.losses.kl_divergence` does, the term is multiplied by :math:`T^2`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from composer_kd.losses.base import check_temperature, mean_over_positions

__all__ = ['signal_kl', 'signal_kl_per_position']


class _SignalKL(torch.autograd.Function):
    """The per-position KL and its closed-form gradient ``T * (q - p)`` (``p`` the rebuilt teacher distribution).

    The student's softened logits are the one ``[..., V]`` float32 temporary: in the forward pass they become
    ``q`` in place, and the backward pass turns ``q`` into the gradient in place, so neither autograd's saved
    intermediates nor a second softmax are needed.
    """

    @staticmethod
    def forward(ctx, student_logits, topk_indices, topk_logits, log_tail, temperature: float):
        vocab, k = student_logits.shape[-1], topk_indices.shape[-1]
        log_n_tail = math.log(vocab - k)
        kept = topk_logits.float() / temperature
        shared = (log_tail.float() - log_n_tail) / temperature  # each dropped class's logit, softened
        log_z = torch.logsumexp(torch.cat([kept, (shared + log_n_tail).unsqueeze(-1)], dim=-1), dim=-1)
        log_p_kept = kept - log_z.unsqueeze(-1)
        log_p_tail = shared - log_z
        p_kept, p_tail = log_p_kept.exp(), log_p_tail.exp()

        # log q_c = u_c - log sum exp(u), with u the softened student logits centred on their mean. Centring makes
        # sum_c u_c = 0, so the dropped classes' sum of log q is -(sum of u over the kept) - (V - k) log Z: the
        # tail term is then (V - k) (log p_tail + log Z) + sum_kept u, a difference of small numbers, rather than of
        # two sums over the whole vocabulary that nearly cancel when the student is close to the teacher. Only the
        # kept entries are centred, so the softened logits are the one [..., V] temporary.
        softened = student_logits.float() / temperature
        if softened.data_ptr() == student_logits.data_ptr():
            softened = softened.clone()  # T = 1 on float32 logits: never write into the caller's tensor
        mean = softened.mean(-1)
        log_z_softened = torch.logsumexp(softened, dim=-1)
        centred_kept = softened.gather(-1, topk_indices) - mean.unsqueeze(-1)
        log_z_student = log_z_softened - mean
        log_q_kept = centred_kept - log_z_student.unsqueeze(-1)

        # 0 log 0 = 0: a kept class or the tail with no mass contributes nothing.
        kept_terms = (p_kept * torch.where(p_kept > 0, log_p_kept - log_q_kept, 0.0)).sum(-1)
        tail_sum = (vocab - k) * (log_p_tail + log_z_student) + centred_kept.sum(-1)
        tail_terms = torch.where(p_tail > 0, p_tail * tail_sum, 0.0)
        if ctx.needs_input_grad[0]:
            ctx.q = softened.sub_(log_z_softened.unsqueeze(-1)).exp_()
            ctx.p_kept, ctx.p_tail, ctx.indices = p_kept, p_tail, topk_indices
            ctx.temperature, ctx.dtype = temperature, student_logits.dtype
        ctx.consumed = False
        return (kept_terms + tail_terms) * temperature**2

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError('signal_kl_per_position supports one backward pass per forward pass.')
        ctx.consumed = True
        # d/ds of T^2 KL(p || softmax(s / T)) is T (q - p); p is p_tail everywhere but at the kept classes.
        grad, ctx.q = ctx.q, None
        grad.sub_(ctx.p_tail.unsqueeze(-1))
        grad.scatter_add_(-1, ctx.indices, ctx.p_tail.unsqueeze(-1) - ctx.p_kept)
        grad.mul_(grad_output.float().unsqueeze(-1) * ctx.temperature)
        return grad.to(ctx.dtype), None, None, None, None


def signal_kl_per_position(
    student_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logits: torch.Tensor,
    log_tail: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T**2 * KL(p || q)`` at each position, ``p`` rebuilt from the stored signal (see the module's text).

    A pure function of one chunk of positions, so that a loop over chunks of the student's logits can call it.

    Args:
        student_logits (torch.Tensor): ``[..., V]`` student logits.
        topk_indices (torch.Tensor): ``[..., k]`` the teacher's kept classes.
        topk_logits (torch.Tensor): ``[..., k]`` their logits (temperature 1).
        log_tail (torch.Tensor): ``[...]`` ``logsumexp`` of the teacher's other ``V - k`` logits.
        temperature (float, optional): Softening temperature, ``> 0``. Default: ``1.0``.

    Returns:
        torch.Tensor: ``[...]`` float32 losses.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache import topk_compress, topk_logits
            from composer_kd.losses.signal import signal_kl_per_position

            teacher = torch.randn(3, 50)
            values, indices, tail = topk_compress(teacher, k=5)
            # A student whose logits are the rebuilt teacher's has zero loss.
            rebuilt = topk_logits(values, indices, vocab_size=50, tail=tail)
            assert signal_kl_per_position(rebuilt, indices, values, tail).abs().max() < 1e-5
    """
    check_temperature(temperature)
    vocab, k = student_logits.shape[-1], topk_indices.shape[-1]
    if topk_logits.shape != topk_indices.shape or topk_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f'topk_indices {tuple(topk_indices.shape)} and topk_logits {tuple(topk_logits.shape)} must both be the '
            f'student logits shape {tuple(student_logits.shape)} with k in place of the vocabulary.'
        )
    if log_tail.shape != student_logits.shape[:-1]:
        raise ValueError(
            f'log_tail {tuple(log_tail.shape)} must have the student logits shape without the vocabulary, '
            f'{tuple(student_logits.shape[:-1])}.'
        )
    if not 0 < k < vocab:
        raise ValueError(f'The signal keeps k={k} logits, which must be fewer than the vocabulary ({vocab}).')
    return _SignalKL.apply(
        student_logits, topk_indices.long(), topk_logits.detach(), log_tail.detach(), float(temperature)
    )


def signal_kl(
    student_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logits: torch.Tensor,
    log_tail: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`signal_kl_per_position` averaged over the positions ``mask`` keeps (all without one).

    Args:
        student_logits (torch.Tensor): ``[..., V]`` student logits.
        topk_indices (torch.Tensor): ``[..., k]`` kept classes.
        topk_logits (torch.Tensor): ``[..., k]`` their teacher logits.
        log_tail (torch.Tensor): ``[...]`` log of the dropped mass.
        temperature (float, optional): Softening temperature. Default: ``1.0``.
        mask (torch.Tensor, optional): Boolean ``[...]``. Default: every position counts.

    Returns:
        torch.Tensor: A float32 scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache import topk_compress
            from composer_kd.losses.signal import signal_kl

            values, indices, tail = topk_compress(torch.randn(2, 7, 30), k=4)
            loss = signal_kl(torch.randn(2, 7, 30), indices, values, tail, temperature=2.0)
    """
    per_position = signal_kl_per_position(student_logits, topk_indices, topk_logits, log_tail, temperature)
    return mean_over_positions(per_position, mask)
