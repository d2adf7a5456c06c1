"""When distillation is on: a ``[start, end)`` window in Composer time."""

from __future__ import annotations

from typing import Optional, Union

from composer.core import State, Time, TimeUnit

__all__ = ['TimeSpec', 'parse_time', 'to_trainer_time', 'reached']

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


def to_trainer_time(time: Time, state: State) -> Time:
    """Express ``time`` in a unit the trainer's timestamp counts at batch granularity where possible.

    Fractions of training become batches when the duration is in epochs and the epoch length is known, so
    ``'0.5dur'`` of a one-epoch run means half of its batches rather than "after the epoch".
    """
    if time.unit != TimeUnit.DURATION:
        return time
    max_duration = state.max_duration
    if max_duration is None:
        raise ValueError('A fractional start/end needs the trainer to have a max_duration.')
    if max_duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return Time(int(time.value * int(state.dataloader_len) * max_duration.value), TimeUnit.BATCH)
    return Time(int(time.value * max_duration.value), max_duration.unit)


def reached(time: Optional[Time], state: State) -> bool:
    """Whether the trainer's clock has reached ``time`` (already expressed by :func:`to_trainer_time`)."""
    return time is not None and state.timestamp.get(time.unit).value >= time.value
