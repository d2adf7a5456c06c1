"""When distillation is on: a ``[start, end)`` window in Composer time."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

from composer.core import State, Time, TimeUnit

__all__ = [
    'TimeSpec',
    'TrainerTime',
    'elapsed',
    'parse_time',
    'parse_window',
    'reached',
    'time_or_fraction',
    'to_trainer_time',
]

#: A point in training: a Composer time string (``'100ba'``, ``'2ep'``, ``'0.1dur'``), a ``Time``, or a
#: fraction of training in ``[0, 1]``.
TimeSpec = Union[str, float, Time]


def parse_time(value: TimeSpec, argument: str) -> Time:
    """Parse ``value`` into a ``Time``; ``argument`` names it in the error."""
    if isinstance(value, bool):
        raise TypeError(f'{argument} must be a time string or a fraction of training, got {value!r}.')
    if isinstance(value, (int, float)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f'{argument}={value!r}: a number is a fraction of training and must lie in [0, 1]; '
                "use a time string such as '100ba' or '2ep' for counts."
            )
        return Time(float(value), TimeUnit.DURATION)
    try:
        time = Time.from_input(value)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"{argument}={value!r} is not a Composer time string (e.g. '100ba', '2ep', '0.5dur').") from e
    if time.unit == TimeUnit.SECOND:
        raise ValueError(f'{argument}={value!r}: wall-clock time cannot bound distillation.')
    if time.unit == TimeUnit.DURATION and not 0.0 <= time.value <= 1.0:
        raise ValueError(f'{argument}={value!r}: a duration fraction must lie in [0, 1].')
    return time


def parse_window(start: TimeSpec, end: Optional[TimeSpec]) -> tuple[Time, Optional[Time]]:
    """Parse a ``[start, end)`` window (``end=None``: the end of training), refusing an end not after its start.

    Example:
        .. testcode::

            from composer_kd.window import parse_window

            start, end = parse_window('2ep', None)
            assert str(start) == '2ep' and end is None
    """
    start_time = parse_time(start, 'start')
    end_time = None if end is None else parse_time(end, 'end')
    if end_time is not None and end_time.unit == start_time.unit and end_time.value <= start_time.value:
        raise ValueError(f'end={end!r} must come after start={start!r}.')
    return start_time, end_time


def time_or_fraction(text: Optional[str]) -> Union[str, float, None]:
    """A point in training as a YAML file or a command line writes it, in the form :func:`parse_time` takes.

    Text that reads as a number (``'0.5'``) is a fraction of training; any other text is a Composer time string,
    left for :func:`parse_time` to check.

    Args:
        text (str, optional): ``'0.5'``, ``'100ba'``, ``'2ep'``, ...

    Returns:
        str | float | None: The fraction as a float, the time string as it is, or ``None`` for ``None``.

    Example:
        .. testcode::

            from composer_kd.window import parse_time, time_or_fraction

            assert time_or_fraction('0.5') == 0.5 and time_or_fraction('100ba') == '100ba'
            assert str(parse_time(time_or_fraction('0.25'), 'start')) == '0.25dur'
    """
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


class TrainerTime(NamedTuple):
    """A point in training in a unit the trainer's clock counts, possibly between two ticks of it (``2.5`` batches).

    Composer's ``Time`` holds whole batches only; a fraction of training resolved against ``max_duration`` often
    falls between two, and rounding it would move schedules and windows (``'0.5dur'`` of 5 batches is 2.5).
    """

    value: float
    unit: TimeUnit


def to_trainer_time(time: Time, state: State) -> TrainerTime:
    """Express ``time`` in a unit the trainer's timestamp counts, at batch granularity where possible.

    Fractions of training are resolved against ``max_duration`` without rounding: ``'0.5dur'`` of a 5-batch run
    is batch 2.5, so a window ending there covers batches 0, 1 and 2 (those begun before half of training was
    done), and a schedule ending there is interpolated at 0, 0.4, 0.8 of its way on them. Epochs become batches
    when the epoch length is known, so ``'0.5dur'`` of a one-epoch run means half of its batches rather than
    "after the epoch".

    Example:
        .. testcode::

            from types import SimpleNamespace
            from composer.core import Time
            from composer_kd.window import parse_time, to_trainer_time

            state = SimpleNamespace(max_duration=Time.from_input('5ba'), dataloader_len=None)
            assert to_trainer_time(parse_time('0.5dur', 'end'), state).value == 2.5
    """
    value, unit = time.value, time.unit
    if unit == TimeUnit.DURATION:
        if state.max_duration is None:
            raise ValueError('A fraction of training needs the trainer to have a max_duration.')
        value, unit = value * state.max_duration.value, state.max_duration.unit
    if unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        value, unit = value * int(state.dataloader_len), TimeUnit.BATCH
    return TrainerTime(float(value), unit)


def elapsed(unit: TimeUnit, state: State) -> int:
    """The trainer's clock in ``unit``."""
    return int(state.timestamp.get(unit).value)


def reached(time: Optional[TrainerTime], state: State) -> bool:
    """Whether the trainer's clock has reached ``time`` (already expressed by :func:`to_trainer_time`)."""
    return time is not None and elapsed(time.unit, state) >= time.value
