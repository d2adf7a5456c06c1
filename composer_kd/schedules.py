"""Values that change over training (the temperature, the loss weights): progressive distillation."""

from __future__ import annotations

import math
from typing import Optional, Union

from composer.core import State

from composer_kd.window import TimeSpec, elapsed, parse_time, to_trainer_time

__all__ = [
    'SCHEDULES',
    'ConstantSchedule',
    'CosineSchedule',
    'LinearSchedule',
    'Schedule',
    'ScheduleOrValue',
    'build_schedule',
    'value_at',
]


class Schedule:
    """A value that moves from ``start_value`` to ``end_value`` between the times ``start`` and ``end``.

    Before ``start`` it is ``start_value``, after ``end`` it is ``end_value``; in between, :meth:`shape` maps the
    progress in ``[0, 1]`` to the fraction of the way travelled. Being a pure function of the trainer's clock,
    a schedule needs no state in checkpoints and resumes exactly. Times given as fractions of training are not
    rounded to whole batches: ``LinearSchedule(1, 0, end='0.5dur')`` over 5 batches gives 1.0, 0.6, 0.2, 0, 0.

    Args:
        start_value (float): The value until ``start``.
        end_value (float): The value from ``end`` on.
        start (str | float | Time, optional): Composer time string or fraction of training. Default: ``0.0``.
        end (str | float | Time, optional): Composer time string or fraction of training. Default: ``1.0``.

    Returns:
        float: What calling ``schedule(state)`` gives: the value in force at the trainer's time.

    Example:
        .. testcode::

            from composer_kd import Schedule

            # Keeps start_value for the first half of the way, then end_value.
            class StepDown(Schedule):
                def shape(self, progress: float) -> float:
                    return 0.0 if progress < 0.5 else 1.0

            temperature = StepDown(4.0, 1.0, end='10ep')
            assert temperature.bounds == (1.0, 4.0)
    """

    def __init__(self, start_value: float, end_value: float, start: TimeSpec = 0.0, end: TimeSpec = 1.0):
        self.start_value = float(start_value)
        self.end_value = float(end_value)
        self.start = parse_time(start, 'start')
        self.end = parse_time(end, 'end')

    def shape(self, progress: float) -> float:
        """The fraction of the way from ``start_value`` to ``end_value`` at ``progress`` in ``[0, 1]``."""
        raise NotImplementedError

    def progress(self, state: State) -> float:
        """How far between ``start`` and ``end`` the trainer is, in ``[0, 1]``."""
        start, end = to_trainer_time(self.start, state), to_trainer_time(self.end, state)
        if start.unit != end.unit:
            raise ValueError(
                f'{self!r}: start {self.start} and end {self.end} resolve to different units '
                f'({start.unit.value}, {end.unit.value}) under this trainer; give both in one unit.'
            )
        if end.value <= start.value:
            return 1.0 if elapsed(end.unit, state) >= end.value else 0.0
        return min(max((elapsed(start.unit, state) - start.value) / (end.value - start.value), 0.0), 1.0)

    def __call__(self, state: State) -> float:
        return self.start_value + (self.end_value - self.start_value) * self.shape(self.progress(state))

    @property
    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes."""
        return min(self.start_value, self.end_value), max(self.start_value, self.end_value)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.start_value}, {self.end_value}, start={self.start!s}, end={self.end!s})'


class ConstantSchedule(Schedule):
    """Always ``value``.

    Args:
        value (float): The value.

    Returns:
        float: What calling ``schedule(state)`` gives: always ``value``.

    Example:
        .. testcode::

            from composer_kd import ConstantSchedule

            schedule = ConstantSchedule(0.5)
    """

    def __init__(self, value: float):
        super().__init__(value, value)

    def shape(self, progress: float) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f'ConstantSchedule({self.start_value})'


class LinearSchedule(Schedule):
    """Moves in a straight line.

    Args:
        start_value (float): The value until ``start``.
        end_value (float): The value from ``end`` on.
        start (str | float | Time, optional): Composer time string or fraction of training. Default: ``0.0``.
        end (str | float | Time, optional): Composer time string or fraction of training. Default: ``1.0``.

    Returns:
        float: What calling ``schedule(state)`` gives: the value in force at the trainer's time.

    Example:
        .. testcode::

            from composer_kd import Distillation, KLDivergence, LinearSchedule
            import torch

            # Soft targets early, sharper later; the distillation weight fades over the first half.
            distillation = Distillation(
                torch.nn.Linear(4, 2),
                KLDivergence(),
                temperature=LinearSchedule(8.0, 1.0),
                kd_loss_weight=LinearSchedule(1.0, 0.0, end='0.5dur'),
            )
    """

    def shape(self, progress: float) -> float:
        return progress


class CosineSchedule(Schedule):
    """Moves along half a cosine: slowly at both ends.

    Args:
        start_value (float): The value until ``start``.
        end_value (float): The value from ``end`` on.
        start (str | float | Time, optional): Composer time string or fraction of training. Default: ``0.0``.
        end (str | float | Time, optional): Composer time string or fraction of training. Default: ``1.0``.

    Returns:
        float: What calling ``schedule(state)`` gives: the value in force at the trainer's time.

    Example:
        .. testcode::

            from composer_kd import CosineSchedule

            schedule = CosineSchedule(4.0, 1.0, start='1ep', end='5ep')
    """

    def shape(self, progress: float) -> float:
        return (1.0 - math.cos(math.pi * progress)) / 2.0


#: A constant or a schedule.
ScheduleOrValue = Union[float, Schedule]


def value_at(value: ScheduleOrValue, state: State) -> float:
    """``value`` itself, or the schedule's value at the trainer's current time."""
    return value(state) if isinstance(value, Schedule) else float(value)


#: Every schedule by the kind name recipes use for it.
SCHEDULES: dict[str, type[Schedule]] = {
    'constant': ConstantSchedule,
    'linear': LinearSchedule,
    'cosine': CosineSchedule,
}


def build_schedule(
    kind: str, start_value: float, end_value: Optional[float] = None, start: TimeSpec = 0.0, end: TimeSpec = 1.0
) -> Schedule:
    """The schedule of kind ``kind`` (a key of :data:`SCHEDULES`); a ``'constant'`` one holds ``start_value``.

    Args:
        kind (str): ``'constant'``, ``'linear'`` or ``'cosine'``.
        start_value (float): The value until ``start`` (the only value of a constant schedule).
        end_value (float, optional): The value from ``end`` on. Default: ``start_value``.
        start (str | float | Time, optional): Composer time string or fraction of training. Default: ``0.0``.
        end (str | float | Time, optional): Composer time string or fraction of training. Default: ``1.0``.

    Returns:
        Schedule: The schedule.

    Raises:
        ValueError: For an unknown kind (the message lists the known ones).

    Example:
        .. testcode::

            from composer_kd.schedules import LinearSchedule, build_schedule

            schedule = build_schedule('linear', 4.0, 1.0, end='0.5dur')
            assert isinstance(schedule, LinearSchedule) and schedule.bounds == (1.0, 4.0)
    """
    if kind not in SCHEDULES:
        raise ValueError(f'Unknown schedule kind {kind!r}; known: {", ".join(SCHEDULES)}.')
    if kind == 'constant':
        return ConstantSchedule(start_value)
    return SCHEDULES[kind](start_value, start_value if end_value is None else end_value, start=start, end=end)
