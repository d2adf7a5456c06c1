"""What each option of :class:`~composer_kd.Distillation` becomes in a fit: one registry, by the option's class.

A capability is added to ``Distillation`` by giving it an option class, a :class:`PartKind` registered here (the
part or source it builds when a fit starts, and any check it makes earlier), and the option's argument; the
algorithm's own loop never names it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from composer.core import Event, State
from composer.loggers import Logger
from torch import nn

from composer_kd.cache import TeacherCache
from composer_kd.losses.fused import per_position_terms
from composer_kd.losses.objective import CombinedLoss
from composer_kd.parts.base import FitContext, Part, Source
from composer_kd.parts.features import FeatureDistillation
from composer_kd.parts.fused import Fused, FusedSource, refuse_fsdp_v1_student
from composer_kd.parts.guard import NonFiniteGuard
from composer_kd.parts.live import CachedTeachers, LiveTeachers
from composer_kd.parts.mixing import refuse_interpolated_loss
from composer_kd.parts.onpolicy import OnPolicy
from composer_kd.parts.signal import StoredSignal, check_signal_loss
from composer_kd.signal.distill import TeacherSignal

__all__ = ['PART_KINDS', 'FitParts', 'PartKind', 'alone_reason', 'part_kind', 'register_part_kind']


def _no_check(option: Any, kd_loss_fn: nn.Module) -> None:
    return None


def _no_init(option: Any, state: State, teachers: Sequence[nn.Module]) -> None:
    return None


@dataclass(frozen=True)
class PartKind:
    """What one kind of option does in a fit.

    Args:
        start (Callable[[option, FitContext], Part | None]): Builds the fit's part (or its source: a
            :class:`~composer_kd.parts.base.Source`) when the fit starts; ``None`` when the option has nothing to
            do in it.
        check (Callable[[option, nn.Module], None], optional): Refuses, when ``Distillation`` is built, a
            distillation loss the part cannot compute. Default: accepts any.
        init (Callable[[option, State, Sequence[nn.Module]], None], optional): Runs at ``Event.INIT`` with the
            teachers as given (to refuse a model early, or to add parameters while the optimizer can take them).
            Default: nothing.
        alone (str, optional): Why a ``Distillation`` with this option must be the only one of its trainer (the
            error's words); ``None`` when it combines with others.
    """

    start: Callable[[Any, FitContext], Optional[Part]]
    check: Callable[[Any, nn.Module], None] = _no_check
    init: Callable[[Any, State, Sequence[nn.Module]], None] = _no_init
    alone: Optional[str] = None


def _start_on_policy(option: OnPolicy, fit: FitContext) -> Part:
    return option.start(fit.state, fit.running_teachers, fit.log_key('').rstrip('/'))


#: The registry: ``{option class: PartKind}``.
PART_KINDS: dict[type, PartKind] = {
    TeacherCache: PartKind(start=lambda cache, fit: CachedTeachers(fit, cache)),
    # Every Distillation has a guard, so its check at Event.INIT also screens the trainer's other algorithms.
    NonFiniteGuard: PartKind(
        start=lambda guard, fit: guard, init=lambda guard, state, teachers: refuse_interpolated_loss(state)
    ),
    FeatureDistillation: PartKind(
        start=lambda features, fit: features.begin(fit) if features else None,
        init=lambda features, state, teachers: features.init(state, teachers),
    ),
    OnPolicy: PartKind(start=_start_on_policy, init=lambda option, state, teachers: option.check(state, teachers)),
    Fused: PartKind(
        start=lambda option, fit: FusedSource(option, fit),
        check=lambda option, kd_loss_fn: per_position_terms(kd_loss_fn),
        init=lambda option, state, teachers: refuse_fsdp_v1_student(state),
        alone=(
            "fused=... must be the only Distillation of its Trainer: it computes the student's loss itself and "
            'the student makes no logits for another instance to read'
        ),
    ),
    # A stored signal is the fit's teacher (FitContext.signal): the default source reads it, and the fused source
    # takes it in its loop.
    TeacherSignal: PartKind(
        start=lambda signal, fit: None, check=lambda signal, kd_loss_fn: check_signal_loss(kd_loss_fn)
    ),
}


def part_kind(option: Any) -> PartKind:
    """The :class:`PartKind` registered for ``option``'s class (or the nearest base class registered)."""
    for cls in type(option).__mro__:
        if cls in PART_KINDS:
            return PART_KINDS[cls]
    raise TypeError(
        f'{type(option).__name__} is not an option Distillation knows: register its PartKind with '
        'composer_kd.parts.registry.register_part_kind.'
    )


def alone_reason(options: Iterable[Any]) -> Optional[str]:
    """Why a ``Distillation`` with ``options`` must be its trainer's only one (``None`` when it need not be)."""
    return next((kind.alone for kind in map(part_kind, options) if kind.alone), None)


def register_part_kind(option_class: type, kind: PartKind) -> None:
    """Register what options of ``option_class`` do in a fit (replacing an earlier registration)."""
    PART_KINDS[option_class] = kind


class FitParts:
    """The parts of one fit, the plan first, and its source: which part each event goes to, and the loss step.

    Args:
        fit (FitContext): The fit.
        options (Sequence[Any]): The options that become parts (see :data:`PART_KINDS`), in the order their
            parts act; at most one of them gives a source (the table of conflicting options sees to it). Otherwise
            the fit's teacher is the source: its stored signal (:class:`~composer_kd.parts.signal.StoredSignal`),
            or live teachers (:class:`~composer_kd.parts.live.LiveTeachers`).
    """

    def __init__(self, fit: FitContext, options: Sequence[Any]):
        built = [fit.plan, *(part_kind(option).start(option, fit) for option in options)]
        self.parts: list[Part] = [part for part in built if part is not None]
        sources = [part for part in self.parts if isinstance(part, Source)]
        if sources:
            self.source: Source = sources[0]
        else:
            self.source = StoredSignal(fit.signal) if fit.signal is not None else LiveTeachers(fit)
            self.parts.append(self.source)
        self._adjusting = [part for part in self.parts if type(part).adjust is not Part.adjust]
        self.by_event: dict[Event, list[Part]] = {}
        for part in self.parts:
            for event in part.events:
                self.by_event.setdefault(event, []).append(part)

    @property
    def events(self) -> frozenset[Event]:
        """Every event some part acts on."""
        return frozenset(self.by_event)

    def on_event(self, event: Event, fit: FitContext, logger: Logger) -> None:
        """Hand ``event`` to the parts that act on it, in order."""
        for part in self.by_event.get(event, ()):
            part.on_event(event, fit, logger)

    def loss(self, fit: FitContext) -> CombinedLoss:
        """The loss dict of a distilling microbatch: the source's terms, as each part adjusts them."""
        terms = self.source.terms(fit)
        for part in self._adjusting:
            part.adjust(terms, fit)
        return terms.combine(fit.name)

    def end(self) -> None:
        """End every part, the last built first."""
        for part in reversed(self.parts):
            part.end()
