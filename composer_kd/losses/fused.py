"""The output projection fused with the distillation loss: the student's cross-entropy and the distillation term
of a language model, computed a chunk of tokens at a time, so that no ``[tokens, vocabulary]`` tensor is ever
whole.

For a causal language model with a vocabulary of 128k entries, the logits of student and teacher and their
softmaxes dominate training memory (8192 tokens x 128,256 entries is 4 GB per float32 tensor). Here the student's
final hidden states ``[N, H]`` and output weight ``[V, H]`` (and the teacher's) enter instead of logits: for each
chunk of rows, the chunk's logits are made, both losses and the gradient with respect to the chunk's logits are
taken, and that gradient is turned at once into the gradient of the chunk's hidden states and added to the
weight's gradient. The chunk's logits are then dropped. The backward pass only scales what the forward pass wrote.

The loss between distributions is one of the per-position definitions of :mod:`composer_kd.losses` (forward KL,
reverse KL, Jensen-Shannon, the beta-generalized JSD, soft cross-entropy): the unfused losses and this path call
the same functions.

The teacher's side reaches the loop through a :class:`TeacherChunks` provider, which gives the teacher's signal
for a range of rows. :class:`DenseTeacherChunks` projects the teacher's hidden states with its output weight;
:class:`SignalTeacherChunks` reads a stored signal (each position's top-k logits and the log of the rest's mass, as
offline teacher shards hold it) and answers with the sparse fields of :class:`TeacherChunk`, whose term is the
forward KL of :func:`composer_kd.losses.signal.signal_kl_per_position`: no ``[rows, vocabulary]`` teacher tensor
is made, not even a chunk's.

The trainer-side wiring (hooks on a Hugging Face model's output layer, the loss dict) is in
:mod:`composer_kd.parts.fused`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from composer_kd.losses.base import check_temperature, softened_log_probs
from composer_kd.losses.catalog import get_loss
from composer_kd.losses.divergences import (
    JensenShannonDivergence,
    KLDivergence,
    ReverseKLDivergence,
    SoftCrossEntropy,
    forward_kl_terms,
    jensen_shannon_terms,
    reverse_kl_terms,
    soft_cross_entropy_terms,
)
from composer_kd.losses.generative import GeneralizedJSD, generalized_jsd_terms
from composer_kd.losses.labels import IGNORE_INDEX
from composer_kd.losses.signal import signal_kl_per_position

__all__ = [
    'FUSED_LOSSES',
    'DenseTeacherChunks',
    'FusedLosses',
    'SignalTeacherChunks',
    'TeacherChunk',
    'TeacherChunks',
    'default_chunk_size',
    'fused_linear_distillation',
    'per_position_terms',
]

PerPositionTerms = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

#: The losses the fused path computes, by their name in :data:`composer_kd.losses.LOSSES`.
FUSED_LOSSES = ('kl', 'reverse_kl', 'js', 'gjsd', 'soft_ce')

# Elements of one chunk's logits when the caller does not choose: 2**21 float32 values (8 MiB) per temporary;
# a chunk holds about ten such temporaries at its peak, small next to the weight's own gradient.
_CHUNK_ELEMENTS = 2**21


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk when none is given: as many as keep one chunk's logits near ``2**21`` elements.

    Example:
        .. testcode::

            from composer_kd.losses.fused import default_chunk_size

            assert default_chunk_size(32_000) == 65
    """
    return max(1, _CHUNK_ELEMENTS // vocab_size)


def per_position_terms(loss_fn: Union[str, nn.Module]) -> PerPositionTerms:
    """The per-position definition of a distillation loss, as the fused path computes it.

    Args:
        loss_fn (str | nn.Module): A loss of :data:`FUSED_LOSSES` by name, or as a module (its ``beta`` is read for
            :class:`~composer_kd.losses.GeneralizedJSD`).

    Returns:
        Callable: ``(teacher_log_probs, student_log_probs, dim) -> per-position values`` (before ``T ** 2``).

    Raises:
        ValueError: For a loss that is not defined per position between two distributions (MSE, cosine, DKD,
            standardized losses, a custom callable).

    Example:
        .. testcode::

            from composer_kd.losses.fused import per_position_terms
            from composer_kd.losses.divergences import forward_kl_terms

            assert per_position_terms('kl') is forward_kl_terms
    """
    if isinstance(loss_fn, str):
        loss_fn = get_loss(loss_fn)
    # Exact types: a subclass may change the formula, and then the fused path would silently compute another loss.
    table = {
        KLDivergence: forward_kl_terms,
        ReverseKLDivergence: reverse_kl_terms,
        JensenShannonDivergence: jensen_shannon_terms,
        SoftCrossEntropy: soft_cross_entropy_terms,
    }
    if type(loss_fn) in table:
        return table[type(loss_fn)]
    if type(loss_fn) is GeneralizedJSD:
        return generalized_jsd_terms(loss_fn.beta)
    raise ValueError(
        f'The fused output-layer path computes the losses defined per token between two distributions, '
        f'{list(FUSED_LOSSES)}; kd_loss_fn {type(loss_fn).__name__} is not one of them. Use one of these, or '
        'train without fused=.'
    )


@dataclass
class TeacherChunk:
    """The teacher's signal for a range of rows: dense logits, or a sparse top-k signal.

    Attributes:
        logits (torch.Tensor, optional): ``[rows, vocab]`` logits.
        topk_indices (torch.Tensor, optional): ``[rows, k]`` vocabulary indices of the teacher's top entries.
        topk_logits (torch.Tensor, optional): ``[rows, k]`` their logits.
        log_tail (torch.Tensor, optional): ``[rows]`` the log of the (unnormalized) mass of the other entries,
            ``logsumexp`` of their logits.
    """

    logits: Optional[torch.Tensor] = None
    topk_indices: Optional[torch.Tensor] = None
    topk_logits: Optional[torch.Tensor] = None
    log_tail: Optional[torch.Tensor] = None

    @property
    def sparse(self) -> bool:
        """Whether the chunk is a top-k signal rather than dense logits."""
        return self.logits is None


@runtime_checkable
class TeacherChunks(Protocol):
    """What the fused loop asks of the teacher: its signal for rows ``start:end`` of the flattened tokens.

    Implementations: :class:`DenseTeacherChunks` (hidden states and output weight) and
    :class:`SignalTeacherChunks` (a stored top-k signal, :class:`TeacherChunk`'s sparse fields).
    """

    num_rows: int
    vocab_size: int

    def chunk(self, start: int, end: int) -> TeacherChunk: ...


class DenseTeacherChunks:
    """The teachers' logits for a range of rows, projected from their final hidden states on demand.

    With several teachers, their logits are averaged, as :func:`~composer_kd.models.teachers.average_logits` averages
    whole logits tensors. The projections run without gradients, in ``compute_dtype``.

    Args:
        hidden_states (torch.Tensor | Sequence[torch.Tensor]): Each teacher's ``[N, H_t]`` final hidden states.
        weights (torch.Tensor | Sequence[torch.Tensor]): Each teacher's ``[V, H_t]`` output weight.
        biases (torch.Tensor | Sequence[torch.Tensor | None], optional): Each teacher's ``[V]`` output bias.
            Default: none.
        compute_dtype (torch.dtype, optional): The dtype the projection runs in. Default: the autocast dtype when
            autocast is on for the hidden states' device (as the teacher's own output layer would run), else the
            weight's dtype.

    Example:
        .. testcode::

            import torch
            from composer_kd.losses.fused import DenseTeacherChunks

            hidden, weight = torch.randn(6, 4), torch.randn(10, 4)
            chunk = DenseTeacherChunks(hidden, weight).chunk(2, 5)
            assert torch.allclose(chunk.logits, hidden[2:5] @ weight.T)
    """

    def __init__(
        self,
        hidden_states: Union[torch.Tensor, Sequence[torch.Tensor]],
        weights: Union[torch.Tensor, Sequence[torch.Tensor]],
        biases: Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]] = None,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        hidden_states = [hidden_states] if isinstance(hidden_states, torch.Tensor) else list(hidden_states)
        weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
        if biases is None or isinstance(biases, torch.Tensor):
            biases = [biases] * len(weights)
        biases = list(biases)
        if not (len(hidden_states) == len(weights) == len(biases)) or not hidden_states:
            raise ValueError(
                f'DenseTeacherChunks needs one weight and bias per teacher hidden-states tensor, got '
                f'{len(hidden_states)} hidden states, {len(weights)} weights, {len(biases)} biases.'
            )
        rows = {h.shape[0] for h in hidden_states}
        vocab = {w.shape[0] for w in weights}
        for i, (hidden, weight) in enumerate(zip(hidden_states, weights, strict=True)):
            if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
                raise ValueError(
                    f'teacher {i}: hidden states {tuple(hidden.shape)} and output weight {tuple(weight.shape)} must '
                    'be [N, H] and [V, H].'
                )
        if len(rows) > 1 or len(vocab) > 1:
            raise ValueError(f'The teachers disagree on rows {sorted(rows)} or vocabulary sizes {sorted(vocab)}.')
        device_type = hidden_states[0].device.type
        if compute_dtype is None:
            autocast = torch.is_autocast_enabled(device_type)
            compute_dtype = torch.get_autocast_dtype(device_type) if autocast else weights[0].dtype
        self.compute_dtype = compute_dtype
        self.num_rows = rows.pop()
        self.vocab_size = vocab.pop()
        self._hidden = [h.detach() for h in hidden_states]
        # Cast once per step, not per chunk (autocast caches its cast weights the same way).
        self._weights = [w.detach().to(compute_dtype) for w in weights]
        self._biases = [None if b is None else b.detach().to(compute_dtype) for b in biases]

    def chunk(self, start: int, end: int) -> TeacherChunk:
        with torch.no_grad(), torch.autocast(self._hidden[0].device.type, enabled=False):
            logits = [
                F.linear(hidden[start:end].to(self.compute_dtype), weight, bias)
                for hidden, weight, bias in zip(self._hidden, self._weights, self._biases, strict=True)
            ]
        if len(logits) == 1:
            return TeacherChunk(logits=logits[0])
        return TeacherChunk(logits=torch.stack([t.float() for t in logits]).mean(dim=0))


class SignalTeacherChunks:
    """A stored teacher signal for a range of rows: each row's top-k logits, their classes and the log tail mass.

    The fused loop computes its term with :func:`~composer_kd.losses.signal.signal_kl_per_position`, the same
    per-position KL the unfused :func:`~composer_kd.losses.signal.signal_kl` averages.

    Args:
        topk_indices (torch.Tensor): ``[N, k]`` kept classes.
        topk_logits (torch.Tensor): ``[N, k]`` their logits.
        log_tail (torch.Tensor): ``[N]`` the log of the other classes' mass.
        vocab_size (int): ``V``.

    Example:
        .. testcode::

            import torch
            from composer_kd.cache import topk_compress
            from composer_kd.losses.fused import SignalTeacherChunks

            values, indices, tail = topk_compress(torch.randn(6, 20), k=4)
            chunk = SignalTeacherChunks(indices, values, tail, vocab_size=20).chunk(2, 5)
            assert chunk.sparse and chunk.topk_indices.shape == (3, 4)
    """

    def __init__(self, topk_indices: torch.Tensor, topk_logits: torch.Tensor, log_tail: torch.Tensor, vocab_size: int):
        if (
            topk_indices.ndim != 2
            or topk_logits.shape != topk_indices.shape
            or log_tail.shape != topk_indices.shape[:1]
        ):
            raise ValueError(
                f'A teacher signal for the fused loop is [N, k] indices and logits and [N] log tail mass, got '
                f'{tuple(topk_indices.shape)}, {tuple(topk_logits.shape)} and {tuple(log_tail.shape)}.'
            )
        self.num_rows, self.vocab_size = topk_indices.shape[0], int(vocab_size)
        self._indices, self._logits, self._log_tail = topk_indices.long(), topk_logits.detach(), log_tail.detach()

    def chunk(self, start: int, end: int) -> TeacherChunk:
        return TeacherChunk(
            topk_indices=self._indices[start:end],
            topk_logits=self._logits[start:end],
            log_tail=self._log_tail[start:end],
        )


class FusedLosses(NamedTuple):
    """The fused path's result: ``total`` carries the gradients; the two terms are detached values to log."""

    total: torch.Tensor
    original: torch.Tensor
    kd: torch.Tensor


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _FusedLinearDistillation(torch.autograd.Function):
    """Forward: both losses a chunk of rows at a time, writing their gradients; backward: scale and hand them."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        teacher: TeacherChunks,
        labels: Optional[torch.Tensor],
        kd_mask: Optional[torch.Tensor],
        terms: PerPositionTerms,
        temperature: float,
        org_loss_weight: float,
        kd_loss_weight: float,
        chunk_size: int,
    ):
        rows, device = hidden.shape[0], hidden.device
        compute_dtype = _compute_dtype(hidden, weight)
        wants_hidden, wants_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wants_bias = bias is not None and ctx.needs_input_grad[2]
        wants_any = wants_hidden or wants_weight or wants_bias
        # Each term is a mean over its own positions, as the unfused losses take it: the cross-entropy over rows
        # with a label, the distillation term over the rows the mask keeps. Empty sets divide by one (no sync).
        labelled = labels != IGNORE_INDEX if labels is not None else torch.zeros(rows, dtype=torch.bool, device=device)
        kept = kd_mask if kd_mask is not None else torch.ones(rows, dtype=torch.bool, device=device)
        ce_scale = 1.0 / labelled.sum().clamp(min=1).float()
        kd_scale = 1.0 / kept.sum().clamp(min=1).float()
        safe_labels = labels.clamp(min=0) if labels is not None else None

        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight) if wants_weight else None
        grad_bias = torch.zeros_like(bias) if wants_bias else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):
            weight_c = weight.detach().to(compute_dtype)
            bias_c = None if bias is None else bias.detach().to(compute_dtype)
            for start in range(0, rows, chunk_size):
                end = min(start + chunk_size, rows)
                hidden_c = hidden[start:end].detach().to(compute_dtype)
                teacher_chunk = None if teacher is None else teacher.chunk(start, end)
                with torch.enable_grad():
                    logits = F.linear(hidden_c, weight_c, bias_c).detach().requires_grad_(wants_any)
                    kd_rows = _kd_rows(logits, teacher_chunk, terms, temperature)
                    kd_chunk = torch.where(kept[start:end], kd_rows, 0.0).sum() * kd_scale
                    if safe_labels is not None:
                        ce_rows = F.cross_entropy(logits.float(), safe_labels[start:end], reduction='none')
                        ce_chunk = torch.where(labelled[start:end], ce_rows, 0.0).sum() * ce_scale
                    else:
                        ce_chunk = torch.zeros((), dtype=torch.float32, device=device)
                    if wants_any:
                        chunk_total = org_loss_weight * ce_chunk + kd_loss_weight * kd_chunk
                        (grad_logits,) = torch.autograd.grad(chunk_total, logits)
                ce_sum += ce_chunk.detach()
                kd_sum += kd_chunk.detach()
                # Released before the next chunk allocates its own: otherwise two chunks' temporaries coexist.
                del logits, kd_rows, kd_chunk, ce_chunk, teacher_chunk
                if safe_labels is not None:
                    del ce_rows
                if not wants_any:
                    continue
                del chunk_total
                grad_logits = grad_logits.to(compute_dtype)
                if wants_hidden:
                    grad_hidden[start:end] = (grad_logits @ weight_c).to(hidden.dtype)
                if wants_weight:
                    # Accumulated in the weight's own dtype (float32 master weights stay exact under autocast).
                    grad_weight.addmm_(grad_logits.t().to(weight.dtype), hidden_c.to(weight.dtype))
                if wants_bias:
                    grad_bias += grad_logits.sum(dim=0).to(bias.dtype)
                del grad_logits
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.consumed = False
        total = org_loss_weight * ce_sum + kd_loss_weight * kd_sum
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return total, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_original, _grad_kd):
        if ctx.consumed:
            raise RuntimeError('fused_linear_distillation supports one backward pass per forward pass.')
        grads, ctx.grads, ctx.consumed = ctx.grads, None, True
        # Scaled in place: a second buffer the size of the output weight is what fusing exists to avoid.
        scaled = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads]
        return (*scaled, None, None, None, None, None, None, None, None)


def _kd_rows(
    logits: torch.Tensor, teacher: Optional[TeacherChunk], terms: PerPositionTerms, temperature: float
) -> torch.Tensor:
    """The chunk's per-row distillation term, ``T**2`` times the divergence, from dense or top-k teacher logits
    (zero without a teacher)."""
    if teacher is None:
        return torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    if teacher.sparse:
        # Only the forward KL is defined from a top-k signal (per_position_terms is checked by the caller).
        return signal_kl_per_position(logits, teacher.topk_indices, teacher.topk_logits, teacher.log_tail, temperature)
    log_q = softened_log_probs(logits, temperature, -1)
    log_p = softened_log_probs(teacher.logits.detach(), temperature, -1)
    return terms(log_p, log_q, -1) * temperature**2


def _as_teacher_chunks(teacher) -> Optional[TeacherChunks]:
    if teacher is None or isinstance(teacher, TeacherChunks):
        return teacher
    if isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
        return DenseTeacherChunks(*teacher)
    raise TypeError(
        'teacher must be a TeacherChunks provider (e.g. DenseTeacherChunks) or a tuple (hidden_states, weight[, '
        f'bias]), got {type(teacher).__name__}.'
    )


def fused_linear_distillation(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: Union[TeacherChunks, tuple, None],
    labels: Optional[torch.Tensor] = None,
    kd_mask: Optional[torch.Tensor] = None,
    loss_fn: Union[str, nn.Module] = 'kl',
    temperature: Optional[float] = None,
    student_bias: Optional[torch.Tensor] = None,
    org_loss_weight: float = 1.0,
    kd_loss_weight: float = 1.0,
    chunk_size: Optional[int] = None,
) -> FusedLosses:
    r"""The student's cross-entropy and the distillation loss from hidden states and output weights, in chunks.

    Equal, in value and in the gradients of ``student_hidden``, ``student_weight`` and ``student_bias``, to

    ``org_loss_weight * CE(s, labels) + kd_loss_weight * loss_fn(s, t, mask=kd_mask)``

    with ``s = student_hidden @ student_weight.T + student_bias`` and the teacher's logits ``t`` likewise, where
    the cross-entropy is averaged over rows whose label is not ``-100`` (0 when none is) and the distillation
    loss over the rows ``kd_mask`` keeps, but no ``[N, V]`` tensor is made: only ``chunk_size`` rows of logits at
    a time. The gradients are computed during this call (one backward pass per call) and cost two ``[N, H]`` and
    one ``[V, H]`` buffers. Under autocast the projections run in the autocast dtype, as the model's own output
    layer would, and the weight's gradient is accumulated in the weight's dtype.

    The caller applies a causal language model's shift: row ``i``'s label is the token row ``i`` predicts.

    Args:
        student_hidden (torch.Tensor): ``[N, H]`` the student's final hidden states (the output layer's input).
        student_weight (torch.Tensor): ``[V, H]`` the student's output weight.
        teacher (TeacherChunks | tuple | None): The teacher's signal: a provider, or ``(hidden [N, H_t], weight
            [V, H_t] [, bias [V]])``, projected without gradients; ``None`` for the student's cross-entropy alone
            (the distillation term is then 0).
        labels (torch.Tensor, optional): ``[N]`` target token ids, ``-100`` where none. Default: ``None``, the
            cross-entropy term is 0.
        kd_mask (torch.Tensor, optional): ``[N]`` booleans, the rows the distillation term averages over.
            Default: ``None``, every row.
        loss_fn (str | nn.Module, optional): One of :data:`FUSED_LOSSES` by name or as a module. Default: ``'kl'``.
        temperature (float, optional): The softening temperature. Default: ``None``, the module's own (1.0 for a
            name).
        student_bias (torch.Tensor, optional): ``[V]`` the student's output bias. Default: ``None``.
        org_loss_weight (float, optional): Weight of the cross-entropy. Default: ``1.0``.
        kd_loss_weight (float, optional): Weight of the distillation term. Default: ``1.0``.
        chunk_size (int, optional): Rows per chunk. Default: ``None``, :func:`default_chunk_size`.

    Returns:
        FusedLosses: ``total`` (differentiable), ``original`` (the cross-entropy) and ``kd``, float32 scalars.

    Raises:
        ValueError: For shapes that do not fit together, a loss the fused path does not compute, a bad
            temperature or chunk size.

    Example:
        .. testcode::

            import torch
            import torch.nn.functional as F
            from composer_kd import kl_divergence
            from composer_kd.losses.fused import fused_linear_distillation

            hidden = torch.randn(10, 8, requires_grad=True)
            weight, teacher_hidden, teacher_weight = torch.randn(50, 8), torch.randn(10, 6), torch.randn(50, 6)
            labels = torch.randint(0, 50, (10,))
            fused = fused_linear_distillation(
                hidden, weight, (teacher_hidden, teacher_weight), labels, temperature=2.0, chunk_size=3
            )
            s, t = hidden @ weight.T, teacher_hidden @ teacher_weight.T
            assert torch.allclose(fused.total, F.cross_entropy(s, labels) + kl_divergence(s, t, 2.0), atol=1e-5)
    """
    if student_hidden.ndim != 2 or student_weight.ndim != 2 or student_hidden.shape[1] != student_weight.shape[1]:
        raise ValueError(
            f'student_hidden {tuple(student_hidden.shape)} and student_weight {tuple(student_weight.shape)} must be '
            '[N, H] and [V, H].'
        )
    rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    if student_bias is not None and tuple(student_bias.shape) != (vocab,):
        raise ValueError(f'student_bias {tuple(student_bias.shape)} must be [V] = ({vocab},).')
    teacher = _as_teacher_chunks(teacher)
    if teacher is not None and (teacher.num_rows != rows or teacher.vocab_size != vocab):
        raise ValueError(
            f'The teacher gives {teacher.num_rows} rows over a vocabulary of {teacher.vocab_size}; the student has '
            f'{rows} rows over {vocab}. Student and teacher must share the tokenizer and the batch.'
        )
    for name, value in (('labels', labels), ('kd_mask', kd_mask)):
        if value is not None and tuple(value.shape) != (rows,):
            raise ValueError(f'{name} {tuple(value.shape)} must be [N] = ({rows},), one entry per hidden-state row.')
    terms = per_position_terms(loss_fn)
    if isinstance(teacher, SignalTeacherChunks) and terms is not forward_kl_terms:
        raise ValueError(
            'A stored teacher signal (top-k logits and tail mass) defines the forward KL only; loss_fn must be a '
            f'KLDivergence (or "kl"), got {loss_fn if isinstance(loss_fn, str) else type(loss_fn).__name__}.'
        )
    if temperature is None:
        temperature = getattr(loss_fn, 'temperature', 1.0) if not isinstance(loss_fn, str) else 1.0
    check_temperature(temperature)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f'chunk_size must be a positive integer, got {chunk_size!r}.')
    labels = None if labels is None else labels.to(device=student_hidden.device, dtype=torch.long)
    kd_mask = None if kd_mask is None else kd_mask.to(device=student_hidden.device, dtype=torch.bool)
    total, original, kd = _FusedLinearDistillation.apply(
        student_hidden,
        student_weight,
        student_bias,
        teacher,
        labels,
        kd_mask,
        terms,
        float(temperature),
        float(org_loss_weight),
        float(kd_loss_weight),
        chunk_size,
    )
    return FusedLosses(total, original, kd)
