"""The distillation objective: a loss between logits on the positions that count, and its weighted combination
with the model's own loss into the loss dict Composer trains on."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from composer_kd.losses.catalog import LOSSES, get_loss
from composer_kd.losses.divergences import KLDivergence

__all__ = [
    'CombinedLoss',
    'KDLossFn',
    'combine_losses',
    'distillation_loss',
    'resolve_kd_loss',
    'takes_labels',
    'takes_mask',
]

#: A loss between student and teacher logits, e.g. :class:`~composer_kd.KLDivergence`.
KDLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_kd_loss(kd_loss_fn: Union[KDLossFn, str, None]) -> KDLossFn:
    """``Distillation``'s ``kd_loss_fn`` argument as a loss: a name (as recipes give it) is looked up, ``None`` is
    ``KLDivergence(temperature=4.0)``, a callable is kept.

    Example:
        .. testcode::

            from composer_kd.losses import KLDivergence
            from composer_kd.losses.objective import resolve_kd_loss

            assert isinstance(resolve_kd_loss('kl'), KLDivergence)
            assert resolve_kd_loss(None).temperature == 4.0
    """
    if isinstance(kd_loss_fn, str):
        return get_loss(kd_loss_fn)  # unknown names list the known ones
    if kd_loss_fn is None:
        return KLDivergence(temperature=4.0)
    if not callable(kd_loss_fn):
        raise TypeError(
            f'kd_loss_fn must be a loss name (one of {sorted(LOSSES)}) or a callable (student_logits, '
            f'teacher_logits) -> scalar, got {type(kd_loss_fn).__name__}.'
        )
    return kd_loss_fn


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kd_loss_fn: KDLossFn,
    mask: Optional[torch.Tensor] = None,
    loss_takes_mask: Optional[bool] = None,
    labels: Optional[torch.Tensor] = None,
    loss_takes_labels: Optional[bool] = None,
) -> torch.Tensor:
    """``kd_loss_fn`` on the positions that count.

    With a ``mask`` over the logits' leading dimensions (e.g. valid tokens of ``[batch, seq, vocab]`` logits),
    a loss that takes a ``mask`` argument (every loss of this package does) receives it; any other loss receives
    only the selected rows, so a loss averaging over rows averages over valid tokens either way. Passing the
    mask spares copying the logits, which matters for large vocabularies. A loss that takes a ``labels`` argument
    (e.g. :class:`~composer_kd.DecoupledKD`, which needs each position's target class) receives ``labels``,
    selected with the rows when the loss takes no mask.

    Args:
        student_logits (torch.Tensor): The student's logits.
        teacher_logits (torch.Tensor): The teacher's logits, the same shape.
        kd_loss_fn (Callable): Maps ``(student_logits, teacher_logits)`` to a scalar.
        mask (torch.Tensor, optional): Boolean, the logits' shape without the last dimension.
        loss_takes_mask (bool, optional): Whether ``kd_loss_fn`` accepts ``mask=``. Default: ``None``, read from
            its signature (a module's ``forward``) on every call; pass it to spare that.
        labels (torch.Tensor, optional): Integer target classes, the logits' shape without the last dimension
            (see :func:`~composer_kd.models.outputs.target_labels`), for a loss that takes them.
        loss_takes_labels (bool, optional): Whether ``kd_loss_fn`` accepts ``labels=``. Default: ``None``, read
            from its signature like ``loss_takes_mask``.

    Returns:
        torch.Tensor: A scalar; zero (still attached to the student's graph) when no position is valid.

    Raises:
        ValueError: If the shapes differ (the message shows both) or the loss is not a scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import KLDivergence, distillation_loss

            loss = distillation_loss(torch.randn(4, 10), torch.randn(4, 10), KLDivergence(temperature=2.0))
    """
    if student_logits.shape != teacher_logits.shape:
        same_positions = student_logits.shape[:-1] == teacher_logits.shape[:-1]
        detail = (
            f'the teacher has {teacher_logits.shape[-1]} classes (vocabulary entries), the student '
            f'{student_logits.shape[-1]}; they must share one label set / tokenizer'
            if same_positions
            else 'distillation needs them equal'
        )
        raise ValueError(
            f'Teacher logits have shape {tuple(teacher_logits.shape)} but student logits have shape '
            f'{tuple(student_logits.shape)}: {detail}.'
        )
    accepts_labels = loss_takes_labels if loss_takes_labels is not None else takes_labels(kd_loss_fn)
    extra = {'labels': labels} if accepts_labels else {}
    if mask is None:
        loss = kd_loss_fn(student_logits, teacher_logits, **extra)
    else:
        mask = mask.to(device=student_logits.device, dtype=torch.bool)
        accepts_mask = loss_takes_mask if loss_takes_mask is not None else takes_mask(kd_loss_fn)
        if accepts_mask:
            # This package's losses average over valid positions and give 0 when there are none, with no host
            # synchronization (which would stall a GPU's queue every step).
            loss = kd_loss_fn(student_logits, teacher_logits, mask=mask, **extra)
        elif not mask.any():
            return student_logits.sum() * 0.0
        else:
            if labels is not None and accepts_labels:
                extra['labels'] = labels.to(mask.device)[mask]
            loss = kd_loss_fn(student_logits[mask], teacher_logits[mask], **extra)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f'kd_loss_fn must return a scalar tensor, got {shape}.')
    return loss if loss.dim() == 0 else loss.reshape(())


def takes_labels(fn: Callable) -> bool:
    """Whether the loss ``fn`` accepts a ``labels`` argument (for a module: whether its ``forward`` does).

    Example:
        .. testcode::

            from composer_kd import DecoupledKD, KLDivergence
            from composer_kd.losses.objective import takes_labels

            assert takes_labels(DecoupledKD()) and not takes_labels(KLDivergence())
    """
    return _takes(fn, 'labels')


def takes_mask(fn: Callable) -> bool:
    """Whether the loss ``fn`` accepts a ``mask`` argument (for a module: whether its ``forward`` does).

    Example:
        .. testcode::

            from composer_kd import KLDivergence
            from composer_kd.losses.objective import takes_mask

            assert takes_mask(KLDivergence()) and not takes_mask(lambda student, teacher: 0.0)
    """
    return _takes(fn, 'mask')


def _takes(fn: Callable, argument: str) -> bool:
    # A module's own signature is its __call__'s, (*args, **kwargs), whatever its forward takes.
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        return argument in inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class CombinedLoss(dict):
    """The loss dict a :class:`Distillation` leaves in ``state.loss``: named terms and their weighted ``'total'``.

    A plain ``dict`` to Composer (which logs each entry as ``loss/train/<name>`` and trains on ``'total'``), it
    also remembers the weight of every term in the total, so that a second ``Distillation`` in the same trainer
    adds its own terms to this one's instead of weighting the already combined total as if it were the model's
    own loss (see :func:`combine_losses`).

    Args:
        terms (Mapping[str, torch.Tensor]): The named terms, ``'total'`` among them.
        weights (Mapping[str, float]): The weight of each term that enters ``'total'``, kept as ``.weights``.

    Example:
        .. testcode::

            import torch
            from composer_kd import CombinedLoss, combine_losses

            loss = combine_losses(torch.tensor(2.0), torch.tensor(3.0), org_loss_weight=0.1, kd_loss_weight=0.9)
            assert isinstance(loss, CombinedLoss)
            assert loss.weights == {'original': 0.1, 'kd': 0.9}
            assert torch.isclose(loss['total'], torch.tensor(0.1 * 2.0 + 0.9 * 3.0))
    """

    def __init__(self, terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]):
        super().__init__(terms)
        self.weights = dict(weights)


def combine_losses(
    original_loss: Any,
    kd_loss: torch.Tensor,
    org_loss_weight: float,
    kd_loss_weight: float,
    extra_terms: Optional[Mapping[str, tuple[torch.Tensor, float]]] = None,
    name: Optional[str] = None,
) -> CombinedLoss:
    """The loss dict ``{..original terms.., 'original', 'kd', 'total'}`` that replaces the trainer's loss.

    ``total = org_loss_weight * original + kd_loss_weight * kd``. The original loss may be a tensor, a tuple/list
    of tensors, or a dict (as ``ComposerModel.loss`` may return); like Composer, terms are averaged to scalars
    and summed, and a dict's own ``'total'`` is used as the original total when present. Composer logs every
    entry as ``loss/train/<name>``.

    With a ``name``, the distillation term is ``'kd/<name>'`` and each extra term ``'<term>/<name>'``. When
    ``original_loss`` is itself a :class:`CombinedLoss` (another ``Distillation`` of the same trainer ran
    first), its terms are kept with their weights, the model's own loss (``'original'``) has its weight
    multiplied by ``org_loss_weight``, and this call's terms are added: with several instances ``i``,

    ``total = (prod_i org_loss_weight_i) * original + sum_i kd_loss_weight_i * kd_i (+ extra terms)``

    so the model's own loss is counted once, whatever the number of instances.

    Args:
        original_loss: What the model's ``loss`` returned, or an earlier call's result.
        kd_loss (torch.Tensor): The distillation term, a scalar.
        org_loss_weight (float): Weight of the original loss (a factor of it, on top of an earlier call's).
        kd_loss_weight (float): Weight of the distillation term.
        extra_terms (Mapping[str, tuple[torch.Tensor, float]], optional): Further named ``(loss, weight)`` terms,
            e.g. feature distillation's, added to the total.
        name (str, optional): Names this call's terms, so that several can share one loss dict.

    Returns:
        CombinedLoss: The loss terms and their weighted ``'total'``.

    Raises:
        ValueError: If a term of this call is already in ``original_loss`` (two unnamed or same-named calls).

    Example:
        .. testcode::

            import torch
            from composer_kd import combine_losses

            losses = combine_losses(torch.tensor(2.0), torch.tensor(1.0), org_loss_weight=0.1, kd_loss_weight=0.9)
            assert torch.isclose(losses['total'], torch.tensor(1.1))
            both = combine_losses(losses, torch.tensor(3.0), org_loss_weight=1.0, kd_loss_weight=0.5, name='b')
            assert torch.isclose(both['total'], torch.tensor(0.1 * 2.0 + 0.9 * 1.0 + 0.5 * 3.0))
    """
    suffix = '' if name is None else f'/{name}'
    extra = {f'{key}{suffix}': term for key, term in (extra_terms or {}).items()}
    ours = {'kd' + suffix: (kd_loss, kd_loss_weight), **extra}
    if isinstance(original_loss, CombinedLoss):
        clashing = [key for key in ours if key in original_loss]
        if clashing:
            raise ValueError(
                f'Two Distillation algorithms write the loss term {clashing[0]!r}: give each its own name= so '
                "that each writes its own 'kd/<name>' term."
            )
        terms = {k: v for k, v in original_loss.items() if k != 'total'}
        weights = dict(original_loss.weights)
        weights['original'] = weights['original'] * org_loss_weight
    else:
        taken = {'original', *ours}
        if isinstance(original_loss, torch.Tensor):
            terms = {'original': _scalar(original_loss)}
        elif isinstance(original_loss, Mapping):
            terms = {f'original_{k}' if k in taken else k: _scalar(v) for k, v in original_loss.items()}
            terms['original'] = terms.pop('total') if 'total' in terms else sum(terms.values())
        elif isinstance(original_loss, Sequence) and not isinstance(original_loss, str):
            terms = {f'original_{i}': _scalar(v) for i, v in enumerate(original_loss)}
            terms['original'] = sum(terms.values())
        else:
            raise TypeError(f'Cannot combine an original loss of type {type(original_loss).__name__}.')
        weights = {'original': org_loss_weight}
    for key, (loss, weight) in ours.items():
        terms[key] = loss
        weights[key] = weight
    total = None
    for key, weight in weights.items():
        total = weight * terms[key] if total is None else total + weight * terms[key]
    return CombinedLoss({**terms, 'total': total}, weights)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    # A 0-dim loss (the usual case) is used as it is: a mean over one element is still an op and its backward.
    return loss if loss.dim() == 0 else loss.mean()
