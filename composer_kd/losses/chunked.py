"""Token-level forward KL computed a chunk of positions at a time, its gradient written during the forward pass."""

from __future__ import annotations

from typing import Optional

import torch

from composer_kd.losses.base import (
    check_shapes,
    check_temperature,
    softened_log_probs,
)

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
            log_q = softened_log_probs(student[rows], temperature, -1)
            log_p = softened_log_probs(teacher[rows], temperature, -1)
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
    check_temperature(temperature)
    check_shapes(student_logits, teacher_logits)
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
