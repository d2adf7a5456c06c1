"""What every part of a fit shares: the :class:`Part` and :class:`Source` interfaces, one microbatch's
:class:`LossTerms`, and the :class:`FitContext` the parts of one fit read.

A fit of :class:`~composer_kd.Distillation` is made of parts, each owning one capability (the batch plan, the
NaN guard, feature pairs, on-policy generation, ...) and a source, which gives the distillation term of each
microbatch at ``Event.AFTER_LOSS`` (live teachers, live teachers behind a cache, a stored signal, the fused output
layer). ``Distillation`` builds them from its options when the fit starts (see :mod:`composer_kd.parts.registry`),
hands each the events it names, and ends them when the fit ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from composer.core import Event, State
from composer.loggers import Logger
from torch import nn

from composer_kd.losses.objective import CombinedLoss, combine_losses
from composer_kd.models.outputs import Key
from composer_kd.models.sharding import TeacherSharding
from composer_kd.models.teachers import (
    FrozenTeachers,
    TeacherInference,
    TeacherRunner,
    check_teachers_can_run,
    refuse_shared_parameters,
)

__all__ = [
    'FitContext',
    'LossTerms',
    'Part',
    'Source',
    'TeacherKeys',
    'end_teachers',
    'log_key',
    'refuse_empty_dataloader',
    'start_teachers',
]


@dataclass
class LossTerms:
    """One microbatch's terms, from the source's distillation term to the loss dict Composer trains on.

    The source makes them; each part may then change them (add feature terms, reweight the model's own loss);
    :meth:`combine` writes the loss dict.

    Args:
        original (Any): The model's own loss (``state.loss``), or the source's value of it.
        kd (torch.Tensor): The distillation term.
        org_loss_weight (float): Weight of ``original``.
        kd_loss_weight (float): Weight of ``kd``.
        extra (dict[str, tuple[torch.Tensor, float]], optional): Further named ``(loss, weight)`` terms.
        usable (torch.Tensor, optional): A 0-dim device flag: the teachers' logits were free of NaN and +inf
            (``None`` when nothing was screened).
        total (torch.Tensor, optional): A total the source computed itself, carrying the gradients (the fused
            path writes its gradients per chunk); it replaces the weighted sum's ``'total'``.
    """

    original: Any
    kd: torch.Tensor
    org_loss_weight: float
    kd_loss_weight: float
    extra: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    usable: Optional[torch.Tensor] = None
    total: Optional[torch.Tensor] = None

    def combine(self, name: Optional[str] = None) -> CombinedLoss:
        """The loss dict (see :func:`~composer_kd.losses.objective.combine_losses`)."""
        losses = combine_losses(
            self.original, self.kd, self.org_loss_weight, self.kd_loss_weight, extra_terms=self.extra, name=name
        )
        if self.total is not None:
            losses['total'] = self.total
        return losses


class Part:
    """A capability taking part in one fit: the events it acts on, what it does at each, how it gives back.

    Subclasses set :attr:`events` and override what they need; every method does nothing by default.
    """

    #: The events :meth:`on_event` is called for (``Event.AFTER_LOSS`` is the source's, see :meth:`adjust`).
    events: frozenset[Event] = frozenset()

    def on_event(self, event: Event, fit: FitContext, logger: Logger) -> None:
        """Act on one of :attr:`events`."""

    def adjust(self, terms: LossTerms, fit: FitContext) -> None:
        """Change a distilling microbatch's terms after the source made them (at ``Event.AFTER_LOSS``)."""

    def end(self) -> None:
        """Give back everything the part changed; called once when the fit ends."""


class Source(Part):
    """Where the teacher's distribution comes from at ``Event.AFTER_LOSS``: one implementation per source."""

    def terms(self, fit: FitContext) -> LossTerms:
        """The distillation term of the current microbatch and the weights in force."""
        raise NotImplementedError


@dataclass(frozen=True)
class TeacherKeys:
    """How teachers are fed and their logits read: ``input_key``, the logits keys, and the bare-tensor rule (see
    :func:`~composer_kd.models.teachers.resolve_teacher_logits_key`)."""

    input_key: Optional[Key] = None
    student_logits_key: Optional[Key] = None
    teacher_logits_key: Optional[Key] = None
    bare_tensor_is_logits: bool = True


@dataclass
class FitContext:
    """What the parts and the source of one fit read: the trainer's state, the running teachers, the settings.

    Args:
        state (State): The trainer's state.
        runners (list[TeacherRunner]): The teachers as they run (frozen, placed, prepared).
        kd_loss_fn (nn.Module): The distillation loss.
        keys (TeacherKeys): How teachers are fed and logits read.
        causal (bool): Whether logits at position ``i`` predict token ``i + 1``.
        plan (BatchPlan): The teachers of each batch and the values in force
            (:class:`~composer_kd.parts.plan.BatchPlan`).
        guard (NonFiniteGuard): Screens teacher logits for NaN and +inf
            (:class:`~composer_kd.parts.guard.NonFiniteGuard`).
        teacher_inference (TeacherInference): The teachers' inference options.
        name (str, optional): The ``Distillation``'s name (its loss terms and logged values).
        owner (Any, optional): The ``Distillation`` itself (told apart from the trainer's other algorithms).
        signal (TeacherSignal, optional): The stored signal given in place of teachers (then no teacher runs).
    """

    state: State
    runners: list[TeacherRunner]
    kd_loss_fn: nn.Module
    keys: TeacherKeys
    causal: bool
    plan: Any  # a BatchPlan (parts.plan builds on this module)
    guard: Any  # a NonFiniteGuard (likewise)
    teacher_inference: TeacherInference = field(default_factory=TeacherInference)
    name: Optional[str] = None
    owner: Any = None
    signal: Any = None

    def log_key(self, key: str) -> str:
        """Where this fit logs ``key`` (see :func:`log_key`)."""
        return log_key(self.name, key)

    @property
    def running_teachers(self) -> list[nn.Module]:
        """The modules that actually run (converted copies, where the inference options made them)."""
        return [runner.module for runner in self.runners]


def log_key(name: Optional[str], key: str) -> str:
    """Where a ``Distillation`` logs a value: ``distillation/<key>``, or ``distillation/<name>/<key>`` if named."""
    return f'distillation/{key}' if name is None else f'distillation/{name}/{key}'


def refuse_empty_dataloader(state: State) -> None:
    """Refuse a training dataloader with no batch, on which the training loop would wait forever."""
    loader = state.train_dataloader
    empty = (state.dataloader_len is not None and int(state.dataloader_len) == 0) or (
        hasattr(loader, '__len__') and len(loader) == 0  # type: ignore[arg-type]
    )
    if empty:
        raise ValueError(
            'The training dataloader is empty (0 batches): there is nothing to distil on, and the training loop '
            'would wait for a batch forever. Check the dataset and the batch size (drop_last=True with fewer '
            'examples than one batch gives no batch).'
        )


def start_teachers(state: State, teachers: FrozenTeachers, inference: TeacherInference) -> list[TeacherRunner]:
    """Check the teachers against the student, freeze them, place them on the trainer's device and prepare them.

    Returns:
        list[TeacherRunner]: One runner per teacher, released (and the teachers restored) by :func:`end_teachers`.
    """
    sharding = TeacherSharding.for_fit(state, inference.shard)
    refuse_shared_parameters(teachers.modules, state.model)
    check_teachers_can_run(
        teachers.modules, state.model, converts_dtype=bool(inference.dtype), weights_from_rank0=sharding is not None
    )
    refuse_empty_dataloader(state)
    teachers.freeze()
    for teacher in teachers.modules:
        if sharding is None:  # a sharded copy is made on the device, shard by shard, from the teacher where it is
            state.device.module_to_device(teacher)
    runners = [TeacherRunner(teacher, inference, sharding) for teacher in teachers.modules]
    for runner in runners:
        runner.prepare()
    return runners


def end_teachers(teachers: FrozenTeachers, runners: Sequence[TeacherRunner]) -> None:
    """Undo :func:`start_teachers`: each runner's changes released, the teachers' own modes and flags restored."""
    for runner in runners:
        runner.release()
    teachers.restore()
