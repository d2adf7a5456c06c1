"""Live teachers as the source of the distillation term: run on each microbatch, or read back from a cache."""

from __future__ import annotations

from typing import Optional

import torch
from composer.core import Event
from composer.loggers import Logger

from composer_kd.cache import CachedFit, TeacherCache
from composer_kd.losses.objective import distillation_loss, takes_labels, takes_mask
from composer_kd.models.outputs import extract_logits, target_labels, token_mask
from composer_kd.models.teachers import teacher_logits
from composer_kd.parts.base import FitContext, LossTerms, Source
from composer_kd.parts.guard import NonFiniteGuard

__all__ = ['CachedTeachers', 'LiveTeachers']


class LiveTeachers(Source):
    """The active teachers run on each distilling microbatch; their averaged logits, screened by the fit's guard
    for NaN and +inf, give the term ``kd_loss_fn(student_logits, teacher_logits)`` on the positions that count
    (with each position's label, for a loss that takes them).

    Args:
        fit (FitContext): The fit.
    """

    def __init__(self, fit: FitContext):
        self._takes_mask = takes_mask(fit.kd_loss_fn)
        self._takes_labels = takes_labels(fit.kd_loss_fn)

    def run_teachers(self, fit: FitContext, shape: torch.Size) -> torch.Tensor:
        """The active teachers' averaged logits of the current microbatch, which must have ``shape``."""
        active = fit.plan.active
        state = fit.state
        return teacher_logits(
            [fit.runners[index] for index in active],
            state.batch,
            teacher_indices=active,
            expected_shape=shape,
            input_key=fit.keys.input_key,
            logits_key=fit.keys.teacher_logits_key,
            bare_tensor_is_logits=fit.keys.bare_tensor_is_logits,
            precision=state.precision,
            precision_config=state.precision_config,
        )

    def teacher_logits(
        self, fit: FitContext, student_logits: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The teachers' logits and their device flag (NaN and +inf in any teacher's logits carry into the mean)."""
        return fit.guard.screen(self.run_teachers(fit, student_logits.shape))

    def terms(self, fit: FitContext) -> LossTerms:
        state, keys = fit.state, fit.keys
        student_logits = extract_logits(state.outputs, keys.student_logits_key, role='student')
        teacher, usable = self.teacher_logits(fit, student_logits)
        labels = None
        if self._takes_labels:  # e.g. DecoupledKD: each position's target class
            labels = target_labels(state.batch, student_logits, causal=fit.causal, key=keys.student_logits_key)
        kd_loss = distillation_loss(
            student_logits,
            teacher,
            fit.kd_loss_fn,
            mask=token_mask(state.batch, student_logits, causal=fit.causal),
            loss_takes_mask=self._takes_mask,
            labels=labels,
            loss_takes_labels=self._takes_labels,
        )
        org_loss_weight, kd_loss_weight = fit.plan.weights
        return LossTerms(
            state.loss, NonFiniteGuard.mask(kd_loss, usable), org_loss_weight, kd_loss_weight, usable=usable
        )


class CachedTeachers(LiveTeachers):
    """Live teachers behind a :class:`~composer_kd.cache.TeacherCache`: a microbatch whose every example is recorded
    reads its logits back (no teacher runs, and nothing is screened: only finite logits are recorded); any other
    runs the teachers and records their logits.

    Args:
        fit (FitContext): The fit.
        cache (TeacherCache): The cache, bound to this fit's teachers and data here.
    """

    events = CachedFit.EVENTS - {Event.FIT_END}

    def __init__(self, fit: FitContext, cache: TeacherCache):
        super().__init__(fit)
        others = [a for a in fit.state.algorithms if a is not fit.owner]
        self.cached = cache.start(
            fit.state,
            [runner.teacher for runner in fit.runners],
            input_key=fit.keys.input_key,
            logits_key=fit.keys.teacher_logits_key,
            teacher_dtype=fit.teacher_inference.dtype,
            algorithms=others,
        )

    def on_event(self, event: Event, fit: FitContext, logger: Logger) -> None:
        self.cached.on_event(event, fit.state)

    def teacher_logits(
        self, fit: FitContext, student_logits: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        cached, rows = self.cached.lookup(fit.state, student_logits.shape[0], student_logits.device)
        if cached is not None:
            return cached, None
        logits = self.run_teachers(fit, student_logits.shape)
        self.cached.record(rows, logits)  # poisoned rows are not kept
        return fit.guard.screen(logits)

    def end(self) -> None:
        self.cached.cache.flush()
