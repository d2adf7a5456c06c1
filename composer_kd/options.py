"""Distillation's options: the checks of each argument, the one table of which options combine, and the hint for a
misspelled name.

``Distillation``, ``distill()``, the recipes' validation and llm-foundry's entry all check through this module, so a
combination is refused in one place with one message. It imports nothing of the package and nothing heavy (a
schedule is recognised by its ``bounds``), so a recipe is checked before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    'CONFLICTS',
    'Conflict',
    'check_name',
    'check_type',
    'check_n_teachers_to_sample',
    'check_temperature',
    'check_weights',
    'conflicts_among',
    'did_you_mean',
    'nearest_names',
    'given_options',
    'option_fields',
    'refuse_conflicts',
    'refuse_unknown_keywords',
]


def nearest_names(name: Any, known: Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The ``n`` known names closest to ``name``, best first; a name that differs only in case comes first.

    Example:
        .. testcode::

            from composer_kd.options import nearest_names

            assert nearest_names('layer.1', ['layer.0', 'layer.1.fc', 'head'], n=2) == ['layer.0', 'layer.1.fc']
    """
    known = [str(k) for k in known]
    text = str(name)
    by_case = {k.lower(): k for k in known}
    found = [by_case[text.lower()]] if text.lower() in by_case and by_case[text.lower()] != text else []
    found += difflib.get_close_matches(text, known, n=n, cutoff=cutoff)
    if len(found) < n:
        found += [by_case[k] for k in difflib.get_close_matches(text.lower(), list(by_case), n=n, cutoff=cutoff)]
    return list(dict.fromkeys(found))[:n]


def did_you_mean(name: Any, known: Iterable[str], *, cutoff: float = 0.6, prefix: str = '') -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name``, or ``''`` when none is close.

    A name that differs only in case is always found.

    Args:
        name: The name given.
        known (Iterable[str]): The names that exist.
        cutoff (float, optional): How close a suggestion must be (``difflib``'s ratio). Default: ``0.6``.
        prefix (str, optional): Put before the suggestion, e.g. a recipe section ``'distillation.'``. Default: none.

    Example:
        .. testcode::

            from composer_kd.options import did_you_mean

            assert did_you_mean('temprature', ['temperature', 'start']) == "; did you mean 'temperature'?"
            assert did_you_mean('KL', ['kl', 'js']) == "; did you mean 'kl'?"
            assert did_you_mean('zzz', ['kl']) == ''
    """
    close = nearest_names(name, known, cutoff=cutoff)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ''


def refuse_unknown_keywords(function: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Raise Python's ``TypeError`` for an unexpected keyword argument, with the nearest known name.

    Example:
        .. testcode::

            from composer_kd.options import refuse_unknown_keywords

            try:
                refuse_unknown_keywords('Distillation', ['temprature'], ['temperature'])
            except TypeError as e:
                assert "did you mean 'temperature'" in str(e)
    """
    known = list(known)
    for keyword in given:
        if keyword not in known:
            raise TypeError(
                f"{function}() got an unexpected keyword argument '{keyword}'{did_you_mean(keyword, known)}"
            )


@dataclass(frozen=True)
class Conflict:
    """Two options that do not combine, and why (the error's words)."""

    first: str
    second: str
    reason: str

    def message(self) -> str:
        return f'{self.first} cannot be combined with {self.second}: {self.reason}. Drop one of the two.'


_LIVE = 'it needs live teachers, and a stored signal has none'
_FUSED = 'the fused path reads the final hidden states of language models and never makes their logits'
_TASKS = 'each task of a multi-task student has its own teachers and weights'

#: Every pair of options that does not combine. The names are ``Distillation``'s arguments, with
#: ``teachers=TeacherSignal(...)`` for a stored signal in place of teachers, ``on_nonfinite_teacher='skip'`` and
#: ``teacher_inference compile`` for those values, and ``tasks`` for a multi-task recipe's per-task instances.
CONFLICTS: tuple[Conflict, ...] = (
    Conflict('n_teachers_to_sample', 'teachers=TeacherSignal(...)', _LIVE),
    Conflict('feature_pairs', 'teachers=TeacherSignal(...)', _LIVE),
    Conflict('teacher_cache', 'teachers=TeacherSignal(...)', _LIVE),
    Conflict('on_policy', 'teachers=TeacherSignal(...)', _LIVE),
    Conflict(
        'teacher_cache',
        'n_teachers_to_sample',
        "the cache holds the average of every teacher, which is not what a step's sampled teachers give",
    ),
    Conflict(
        'teacher_cache',
        'feature_pairs',
        "feature distillation needs the live teacher's intermediate outputs at every step",
    ),
    Conflict(
        'on_policy',
        'teacher_cache',
        'the cache holds teacher logits per dataset example, and generated sequences are new at every step',
    ),
    Conflict('teacher_inference compile', 'feature_pairs', 'hooks inside a compiled teacher are not reliable'),
    Conflict('fused', 'feature_pairs', _FUSED),
    Conflict('fused', 'teacher_cache', _FUSED),
    Conflict('fused', 'on_policy', _FUSED),
    Conflict('fused', "on_nonfinite_teacher='skip'", _FUSED),
    Conflict('fused', 'teacher_inference compile', _FUSED),
    Conflict('fused', 'student_logits_key', _FUSED),
    Conflict('feature_pairs', 'tasks', _TASKS),
    Conflict('n_teachers_to_sample', 'tasks', _TASKS),
    Conflict('on_policy', 'tasks', 'multi-task students are classifiers, which generate no text'),
    # ``distill(search=...)`` and a recipe's ``search`` section: the grid of settings chosen on validation.
    Conflict(
        'search',
        'tasks',
        'a search chooses one loss, temperature and weight, and each task of a multi-task student has its own',
    ),
    Conflict('search', 'teacher_cache', 'each candidate trains a student of its own'),
)


def given_options(**arguments: Any) -> set[str]:
    """The names :data:`CONFLICTS` uses for the options that ``arguments`` (``Distillation``'s, by name) set.

    An argument counts as given when it is neither ``None``, ``False`` nor empty; ``on_nonfinite_teacher`` only
    when it is ``'skip'``, ``teacher_inference`` only when it compiles, ``teachers`` only when it is a stored
    signal (an object with ``stored_signal = True``).

    Example:
        .. testcode::

            from composer_kd.options import given_options

            assert given_options(fused=True, feature_pairs=(), on_nonfinite_teacher='raise') == {'fused'}
    """
    given = set()
    for name, value in arguments.items():
        if name == 'teachers':
            if getattr(value, 'stored_signal', False):
                given.add('teachers=TeacherSignal(...)')
        elif name == 'on_nonfinite_teacher':
            if value == 'skip':
                given.add("on_nonfinite_teacher='skip'")
        elif name == 'teacher_inference':
            if getattr(value, 'compile', False):
                given.add('teacher_inference compile')
        elif value is not None and value is not False and not (isinstance(value, (list, tuple, dict)) and not value):
            given.add(name)
    return given


def conflicts_among(given: Iterable[str]) -> list[Conflict]:
    """The conflicts of :data:`CONFLICTS` between options in ``given``, in the table's order."""
    given = set(given)
    return [c for c in CONFLICTS if c.first in given and c.second in given]


def refuse_conflicts(given: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the first two options of ``given`` that do not combine, and why.

    Example:
        .. testcode::

            from composer_kd.options import refuse_conflicts

            try:
                refuse_conflicts({'on_policy', 'teacher_cache'})
            except ValueError as e:
                assert str(e).startswith('on_policy cannot be combined with teacher_cache')
    """
    found = conflicts_among(given)
    if found:
        raise ValueError(found[0].message())


_NAME = re.compile(r'[A-Za-z0-9_-]+')


def check_name(name: Optional[str]) -> None:
    """Refuse a ``name=`` that cannot name loss terms and logged values."""
    if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ValueError(f'name must be a non-empty string of letters, digits, _ and -, got {name!r}.')


def _low_and_high(value: Any) -> tuple[Any, Any]:
    bounds = getattr(value, 'bounds', None)  # a Schedule
    return tuple(bounds) if bounds is not None else (value, value)


def _check_scheduled(name: str, value: Any, minimum: float, inclusive: bool) -> None:
    low = _low_and_high(value)[0]
    valid = (
        isinstance(low, (int, float)) and not isinstance(low, bool) and (low >= minimum if inclusive else low > minimum)
    )
    if not valid:
        relation = '>=' if inclusive else '>'
        raise ValueError(f'{name} must be a number {relation} {minimum:g} (or a schedule staying so), got {value!r}.')


def check_type(argument: str, value: Any, expected: type) -> None:
    """Refuse a ``value`` given for ``argument`` that is neither ``None`` nor an ``expected``."""
    if value is not None and not isinstance(value, expected):
        article = 'an' if expected.__name__[0] in 'AEIOU' else 'a'
        raise TypeError(f'{argument} must be {article} {expected.__name__}, got {type(value).__name__}.')


def check_weights(org_loss_weight: Any, kd_loss_weight: Any) -> None:
    """Refuse a negative weight (constant or schedule), and two weights that are both always 0."""
    _check_scheduled('org_loss_weight', org_loss_weight, minimum=0.0, inclusive=True)
    _check_scheduled('kd_loss_weight', kd_loss_weight, minimum=0.0, inclusive=True)
    if _low_and_high(org_loss_weight)[1] == 0 and _low_and_high(kd_loss_weight)[1] == 0:
        raise ValueError('org_loss_weight and kd_loss_weight are both 0: nothing would be trained.')


def check_temperature(temperature: Any, kd_loss_fn: Any) -> None:
    """Refuse a temperature at or below 0, or one given for a loss with no ``temperature`` to set."""
    if temperature is None:
        return
    _check_scheduled('temperature', temperature, minimum=0.0, inclusive=False)
    if not hasattr(kd_loss_fn, 'temperature'):
        raise TypeError(
            f'temperature was given but kd_loss_fn {type(kd_loss_fn).__name__} has no `temperature` attribute to set.'
        )


def check_n_teachers_to_sample(n_teachers_to_sample: Optional[int], n_teachers: int) -> None:
    """Refuse a number of teachers to sample outside ``[1, n_teachers]``."""
    if n_teachers_to_sample is not None and not (
        isinstance(n_teachers_to_sample, int)
        and not isinstance(n_teachers_to_sample, bool)
        and 1 <= n_teachers_to_sample <= n_teachers
    ):
        raise ValueError(
            f'n_teachers_to_sample must be an integer between 1 and the number of teachers ({n_teachers}), '
            f'got {n_teachers_to_sample!r}.'
        )


def option_fields(option_class: type) -> Mapping[str, Any]:
    """``{field name: default}`` of an option dataclass (``OnPolicy``, ``Fused``, ...), for recipe sections."""
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None)
        for f in dataclasses.fields(option_class)
        if f.init
    }
