"""When distillation is on: a ``[start, end)`` window in Composer time."""

from __future__ import annotations

from typing import Optional, Union

from composer.core import State, Time, TimeUnit

__all__ = ['TimeSpec', 'elapsed', 'parse_time', 'reached', 'time_or_fraction', 'to_trainer_time']

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


def to_trainer_time(time: Time, state: State) -> Time:
    """Express ``time`` in a unit the trainer's timestamp counts, at batch granularity where possible.

    Fractions of training are resolved against ``max_duration``; epochs become batches when the epoch length is
    known, so ``'0.5dur'`` of a one-epoch run means half of its batches rather than "after the epoch".
    """
    value, unit = time.value, time.unit
    if unit == TimeUnit.DURATION:
        if state.max_duration is None:
            raise ValueError('A fraction of training needs the trainer to have a max_duration.')
        value, unit = value * state.max_duration.value, state.max_duration.unit
    if unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        value, unit = value * int(state.dataloader_len), TimeUnit.BATCH
    return Time(int(value), unit)


def elapsed(unit: TimeUnit, state: State) -> int:
    """The trainer's clock in ``unit``."""
    return int(state.timestamp.get(unit).value)


def reached(time: Optional[Time], state: State) -> bool:
    """Whether the trainer's clock has reached ``time`` (already expressed by :func:`to_trainer_time`)."""
    return time is not None and elapsed(time.unit, state) >= time.value
