"""The batch plan: which teachers run on each batch, and the weights and temperature in force."""

from __future__ import annotations

from typing import Optional

from composer.core import Event, State, Time
from composer.loggers import Logger

from composer_kd.models.teachers import sample_teachers
from composer_kd.parts.base import FitContext, Part
from composer_kd.schedules import Schedule, ScheduleOrValue, value_at
from composer_kd.window import reached, to_trainer_time

__all__ = ['BatchPlan']


class BatchPlan(Part):
    """Decides, batch by batch, which teachers run and the values in force.

    No teacher runs outside the ``[start, end)`` window; inside it every teacher runs, or
    ``n_teachers_to_sample`` of them drawn from the seed and the step (:func:`~composer_kd.models.teachers.
    sample_teachers`). The weights and temperature are read from their schedules at each batch the teachers run
    on (the temperature is set on the loss), and logged when scheduled. When none of this can change from one batch
    to the next, the plan is made once when the fit starts and the plan handles no event at all: every event an
    algorithm handles costs Composer's engine a trace and a log call.

    Args:
        state (State): The trainer's state at the fit's start (the window is converted to its units).
        n_sources (int): How many teachers there are (a stored signal counts as one).
        n_teachers_to_sample (int, optional): How many to draw per batch; ``None`` for all.
        start (Time): Where the window opens.
        end (Time, optional): Where it closes (exclusive); ``None`` for the end of training.
        org_loss_weight (float | Schedule): Weight of the model's own loss.
        kd_loss_weight (float | Schedule): Weight of the distillation term.
        temperature (float | Schedule, optional): Set on ``kd_loss_fn.temperature``; ``None`` leaves it.

    Example:
        .. testcode::

            from composer.core import Time
            from composer_kd.parts.plan import BatchPlan

            assert BatchPlan.varies_per_batch(None, Time.from_input('0.5dur'), None, (1.0, 1.0, None))
            assert not BatchPlan.varies_per_batch(None, Time.from_input('0dur'), None, (1.0, 1.0, None))
    """

    def __init__(
        self,
        state: State,
        *,
        n_sources: int,
        n_teachers_to_sample: Optional[int],
        start: Time,
        end: Optional[Time],
        org_loss_weight: ScheduleOrValue,
        kd_loss_weight: ScheduleOrValue,
        temperature: Optional[ScheduleOrValue],
    ):
        self.n_sources = n_sources
        self.n_teachers_to_sample = n_teachers_to_sample
        self.window_start = to_trainer_time(start, state)
        self.window_end = None if end is None else to_trainer_time(end, state)
        self.org_loss_weight = org_loss_weight
        self.kd_loss_weight = kd_loss_weight
        self.temperature = temperature
        scheduled = (org_loss_weight, kd_loss_weight, temperature)
        varies = self.varies_per_batch(n_teachers_to_sample, start, end, scheduled)
        self.events = frozenset({Event.BATCH_START}) if varies else frozenset()
        #: The indices of the teachers that run on the current batch (empty: distillation is off for it).
        self.active: list[int] = []
        #: ``(org_loss_weight, kd_loss_weight)`` in force.
        self.weights = (0.0, 0.0)

    @staticmethod
    def varies_per_batch(
        n_teachers_to_sample: Optional[int],
        start: Time,
        end: Optional[Time],
        scheduled: tuple[Optional[ScheduleOrValue], ...],
    ) -> bool:
        """Whether the teachers that run or the values in force can change from one batch to the next."""
        return (
            n_teachers_to_sample is not None
            or start.value != 0
            or end is not None
            or any(isinstance(value, Schedule) for value in scheduled)
        )

    def begin(self, fit: FitContext, logger: Logger) -> None:
        """Make the plan of a fit whose plan never changes (called once the fit's other parts exist)."""
        if not self.events:
            self.active = list(range(self.n_sources))
            self._set_values(fit, logger)

    def teachers_for_batch(self, state: State) -> list[int]:
        """Indices of the teachers that run this batch: none outside the window, else all or a sample."""
        if not reached(self.window_start, state) or reached(self.window_end, state):
            return []
        if self.n_teachers_to_sample is None:
            return list(range(self.n_sources))
        return sample_teachers(
            self.n_sources, self.n_teachers_to_sample, seed=state.rank_zero_seed, step=int(state.timestamp.batch)
        )

    def on_event(self, event: Event, fit: FitContext, logger: Logger) -> None:
        self.active = self.teachers_for_batch(fit.state)
        if self.active:
            self._set_values(fit, logger)

    def end(self) -> None:
        self.active = []

    def _set_values(self, fit: FitContext, logger: Logger) -> None:
        state = fit.state
        self.weights = (value_at(self.org_loss_weight, state), value_at(self.kd_loss_weight, state))
        scheduled = {}
        if isinstance(self.org_loss_weight, Schedule):
            scheduled[fit.log_key('org_loss_weight')] = self.weights[0]
        if isinstance(self.kd_loss_weight, Schedule):
            scheduled[fit.log_key('kd_loss_weight')] = self.weights[1]
        if self.temperature is not None:
            fit.kd_loss_fn.temperature = value_at(self.temperature, state)
            if isinstance(self.temperature, Schedule):
                scheduled[fit.log_key('temperature')] = fit.kd_loss_fn.temperature
        if scheduled:
            logger.log_metrics(scheduled)
