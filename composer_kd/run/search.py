"""Choosing distillation settings on validation data: a small, stated grid tried with short budgets.

A search tries every candidate of a grid (distillation losses x temperatures x distillation weights x label
weights), each for a short budget from the same initial student, with the same batches and seed, and scores it
on one validation split. The best score wins (the first in the grid's order on a tie), and only then is the
student trained, with the winner's settings and the full budget, and reported on the other splits.
:func:`composer_kd.distill` (``search=``) and recipes (a ``search`` section) both run it through
:func:`run_search`; the :class:`SearchReport` it returns lists every candidate with its validation score, and is
printed under the run's summary.

The selection split is never the test split: a split named ``test`` is refused as the one to choose on, the
candidates' trainers are given no evaluation data, and each candidate is evaluated on the selection split only.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

from composer_kd.losses import LOSSES, Standardized, canonical_loss_name, loss_from_name
from composer_kd.options import did_you_mean
from composer_kd.run.reporting import format_table, percent

__all__ = [
    'GRID_KEYS',
    'SEARCH_KEYS',
    'Candidate',
    'SearchReport',
    'SearchSpec',
    'check_split',
    'run_search',
    'search_spec',
]

#: The settings a grid may vary, as :func:`composer_kd.distill` names its arguments.
GRID_KEYS = ('kd_loss', 'temperature', 'kd_loss_weight', 'org_loss_weight')
#: Every key of a ``search`` mapping: the grid's, the budget of each candidate, and the split and metric chosen on.
SEARCH_KEYS = (*GRID_KEYS, 'max_duration', 'split', 'metric')

#: A loss as a grid names it: a name of ``LOSSES``, ``{'name': ..., **options}`` (e.g. ``{'name': 'kl',
#: 'standardize': True}``), or a loss object (copied for each candidate).
LossChoice = Union[str, Mapping[str, Any], Callable[..., Any]]


def _loss_label(loss: LossChoice) -> str:
    if isinstance(loss, str):
        return loss
    if isinstance(loss, Mapping):
        options = ', '.join(f'{k}={v}' for k, v in loss.items() if k != 'name')
        return f'{loss["name"]}({options})' if options else str(loss['name'])
    if isinstance(loss, Standardized):
        return f'standardized {_loss_label(loss.loss)}'
    return type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, '__name__', repr(loss))


def _has_temperature(loss: Any) -> bool:
    # False too for a Standardized loss around one without a temperature: its property raises AttributeError.
    return hasattr(loss, 'temperature')


@dataclass
class Candidate:
    """One setting of a search's grid.

    Attributes:
        kd_loss: The distillation loss: a name, ``{'name': ..., **options}``, or a loss object.
        temperature (float, optional): Its temperature; ``None`` for a loss that has none (or keeps its own).
        kd_loss_weight (float): Weight of the distillation loss.
        org_loss_weight (float): Weight of the student's own loss.

    Example:
        .. testcode::

            from composer_kd.run.search import Candidate

            candidate = Candidate({'name': 'kl', 'standardize': True}, 2.0, 9.0, 0.1)
            assert candidate.describe() == 'kl(standardize=True), T=2, kd weight 9, label weight 0.1'
            assert candidate.loss().temperature == 2.0
    """

    kd_loss: LossChoice
    temperature: Optional[Any]
    kd_loss_weight: Any
    org_loss_weight: Any

    def loss(self) -> Callable[..., Any]:
        """A fresh loss object with these settings (a copy for a loss given as an object)."""
        constant = isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
        temperature = self.temperature if constant else None
        if isinstance(self.kd_loss, str):
            return loss_from_name(self.kd_loss, temperature)
        if isinstance(self.kd_loss, Mapping):
            options = {k: v for k, v in self.kd_loss.items() if k != 'name'}
            return loss_from_name(self.kd_loss['name'], temperature, **options)
        loss = copy.deepcopy(self.kd_loss)
        if temperature is not None and _has_temperature(loss):
            loss.temperature = temperature
        return loss

    def describe(self) -> str:
        """The candidate in a few words, e.g. ``'dkd, T=4, kd weight 1, label weight 1'``."""
        parts = [_loss_label(self.kd_loss)]
        if self.temperature is not None:
            parts.append(f'T={self.temperature:g}' if isinstance(self.temperature, (int, float)) else 'T scheduled')
        for name, value in (('kd weight', self.kd_loss_weight), ('label weight', self.org_loss_weight)):
            parts.append(f'{name} {value:g}' if isinstance(value, (int, float)) else f'{name} scheduled')
        return ', '.join(parts)

    def settings(self) -> dict[str, Any]:
        """The candidate as plain values (for a JSON report): the loss's label, temperature and weights."""

        def plain(value: Any) -> Any:
            return value if value is None or isinstance(value, (int, float)) else repr(value)

        return {
            'kd_loss': _loss_label(self.kd_loss),
            'temperature': plain(self.temperature),
            'kd_loss_weight': plain(self.kd_loss_weight),
            'org_loss_weight': plain(self.org_loss_weight),
        }


@dataclass
class SearchSpec:
    """A checked search: its candidates in order, the budget of each, and the split and metric chosen on.

    Attributes:
        candidates (list[Candidate]): The grid, in the order tried (a tie goes to the earlier).
        max_duration (Any): Each candidate's training budget.
        split (str): The split candidates are scored on.
        metric (str, optional): The metric scored; ``None``: the student's first.
    """

    candidates: list[Candidate]
    max_duration: Any
    split: str = 'val'
    metric: Optional[str] = None


@dataclass
class SearchReport:
    """What a search tried and what it chose.

    Attributes:
        split (str): The split every candidate was scored on.
        metric (str): The metric scored (higher is better).
        max_duration (str): Each candidate's training budget.
        candidates (list[Candidate]): Every candidate, in the order tried.
        scores (list[float]): Each candidate's score on ``split``.
        chosen (int): The index of the chosen candidate: the best score, the first on a tie.
        reference (float, optional): The student trained alone for the same budget, scored the same way, when
            it was trained (a reference, never a candidate).
        seconds (float): Wall time of the search.

    Example:
        .. testcode::

            from composer_kd.run.search import Candidate, SearchReport

            report = SearchReport('val', 'accuracy', '100ba', [Candidate('kl', 4.0, 0.9, 0.1)], [0.9], 0)
            assert report.best.kd_loss == 'kl' and 'chosen' in str(report)
    """

    split: str
    metric: str
    max_duration: str
    candidates: list[Candidate]
    scores: list[float]
    chosen: int
    reference: Optional[float] = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        """The chosen candidate."""
        return self.candidates[self.chosen]

    def rows(self) -> list[dict[str, Any]]:
        """Every candidate's settings and score, and whether it was chosen (for a JSON report)."""
        return [
            {**c.settings(), 'score': s, 'chosen': i == self.chosen}
            for i, (c, s) in enumerate(zip(self.candidates, self.scores, strict=True))
        ]

    def __str__(self) -> str:
        rows = [
            [str(i + 1), c.describe(), percent(s), '<- chosen' if i == self.chosen else '']
            for i, (c, s) in enumerate(zip(self.candidates, self.scores, strict=True))
        ]
        lines = [
            f'Settings chosen on {self.split} {self.metric} ({len(self.candidates)} candidates, '
            f'{self.max_duration} each; the other splits were not looked at):',
            format_table(['#', 'candidate', f'{self.split} {self.metric}', ''], rows, right=[0, 2]),
        ]
        if self.reference is not None:
            lines.append(f'student alone, same budget: {percent(self.reference)} on {self.split} (a reference)')
        lines.extend(self.notes)
        return '\n'.join(lines)


def _values(search: Mapping[str, Any], key: str, default: Any) -> list[Any]:
    if key not in search:
        return [default]
    value = search[key]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f'search[{key!r}] is empty: give at least one value, or leave the key out.')
    return values


def _check_loss(loss: Any, where: str) -> None:
    if isinstance(loss, Mapping):
        if 'name' not in loss:
            raise ValueError(f"{where}: a loss given as a mapping needs its 'name', got {dict(loss)!r}.")
        name = loss['name']
    elif isinstance(loss, str):
        name = loss
    elif callable(loss):
        return
    else:
        raise TypeError(f'{where} must be a loss name, a mapping {{name: ..., **options}} or a loss object.')
    if not isinstance(name, str) or canonical_loss_name(name) is None:
        hint = did_you_mean(name, LOSSES) if isinstance(name, str) else ''
        raise ValueError(f'{where}: unknown loss {name!r}{hint} (known: {", ".join(LOSSES)}).')


def search_spec(
    search: Mapping[str, Any],
    *,
    kd_loss: LossChoice,
    temperature: Any,
    kd_loss_weight: Any,
    org_loss_weight: Any,
    max_duration: Any,
) -> SearchSpec:
    """Check a ``search`` mapping and expand its grid; the other arguments fill the keys it leaves out.

    ``search`` may hold a list (or one value) for each of ``kd_loss``, ``temperature``, ``kd_loss_weight`` and
    ``org_loss_weight``; the grid is their product, in that order. ``max_duration`` is each candidate's budget
    (default: the full one: give a shorter one), ``split`` the split chosen on (default ``'val'``; never one
    named ``'test'``), ``metric`` the metric (default: the student's first). Every candidate's loss is built
    once here, so that a bad name or option fails before anything trains. A loss without a temperature (``mse``,
    ``cosine``) is tried once, whatever the temperatures.

    Args:
        search (Mapping[str, Any]): The search, as :func:`composer_kd.distill` takes it.
        kd_loss: The loss used where ``search`` names none.
        temperature: The temperature likewise.
        kd_loss_weight: The distillation weight likewise.
        org_loss_weight: The label weight likewise.
        max_duration: The budget of each candidate where ``search`` sets none.

    Returns:
        SearchSpec: The candidates, budget, split and metric.

    Raises:
        TypeError: If ``search`` is not a mapping, or a loss is of the wrong kind.
        ValueError: For an unknown key (the nearest known one is named), an empty list, an unknown loss or
            option, or the split ``'test'``.

    Example:
        .. testcode::

            from composer_kd.run.search import search_spec

            spec = search_spec(
                {'kd_loss': ['kl', 'dkd'], 'temperature': [2.0, 4.0], 'max_duration': '50ba'},
                kd_loss='kl',
                temperature=None,
                kd_loss_weight=1.0,
                org_loss_weight=1.0,
                max_duration='500ba',
            )
            assert [c.describe() for c in spec.candidates][:2] == [
                'kl, T=2, kd weight 1, label weight 1',
                'kl, T=4, kd weight 1, label weight 1',
            ]
            assert len(spec.candidates) == 4 and spec.max_duration == '50ba' and spec.split == 'val'
    """
    if not isinstance(search, Mapping):
        raise TypeError(f'search must be a mapping such as {{"kd_loss": ["kl", "dkd"]}}, got {type(search).__name__}.')
    for key in search:
        if key not in SEARCH_KEYS:
            hint = did_you_mean(key, SEARCH_KEYS)
            raise ValueError(f'search: unknown key {key!r}{hint} (known: {", ".join(SEARCH_KEYS)}).')
    split, metric = _split_and_metric(search)
    losses = _values(search, 'kd_loss', kd_loss)
    for i, loss in enumerate(losses):
        _check_loss(loss, f'search[kd_loss][{i}]' if 'kd_loss' in search else 'kd_loss')
    _check_numbers(search)
    candidates = _candidates(
        losses,
        _values(search, 'temperature', temperature),
        _values(search, 'kd_loss_weight', kd_loss_weight),
        _values(search, 'org_loss_weight', org_loss_weight),
    )
    return SearchSpec(candidates, search.get('max_duration', max_duration), split, metric)


def _split_and_metric(search: Mapping[str, Any]) -> tuple[str, Optional[str]]:
    """The split a search chooses on (never the test split) and the metric it scores."""
    split = search.get('split', 'val')
    if not isinstance(split, str) or not split:
        raise ValueError(f'search[split] must be the name of an evaluation split, got {split!r}.')
    if split.lower() == 'test':
        raise ValueError(
            'search[split]: settings are never chosen on the test split (its score would no longer be an honest '
            "estimate); choose on a validation split, e.g. eval_data={'val': ..., 'test': ...}."
        )
    metric = search.get('metric')
    if metric is not None and not isinstance(metric, str):
        raise ValueError(f'search[metric] must be a metric name, got {metric!r}.')
    return split, metric


def _check_numbers(search: Mapping[str, Any]) -> None:
    """Refuse searched temperatures that are not > 0 and searched weights that are not >= 0."""
    for name in ('temperature', 'kd_loss_weight', 'org_loss_weight'):
        if name in search:
            for value in _values(search, name, None):
                low = 0 if name != 'temperature' else None
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not number or (low is not None and value < low) or (low is None and value <= 0):
                    relation = '> 0' if low is None else '>= 0'
                    raise ValueError(f'search[{name}] must hold numbers {relation}, got {value!r}.')


def _candidates(
    losses: Sequence[LossChoice],
    temperatures: Sequence[Any],
    kd_loss_weights: Sequence[Any],
    org_loss_weights: Sequence[Any],
) -> list[Candidate]:
    """The product of the settings, in order, each loss built once; a loss without a temperature is tried once
    whatever the temperatures."""
    candidates, seen = [], set()
    for loss, t, w, o in itertools.product(losses, temperatures, kd_loss_weights, org_loss_weights):
        candidate = Candidate(loss, t, w, o)
        try:
            built = candidate.loss()
        except (TypeError, ValueError) as e:
            raise ValueError(f'search: the loss {_loss_label(loss)} refused its settings: {e}') from e
        if not _has_temperature(built):
            candidate.temperature = None
        key = (id(loss), repr(candidate.temperature), repr(w), repr(o))
        if key in seen:
            continue
        seen.add(key)
        candidates.append(candidate)
    return candidates


def run_search(
    spec: SearchSpec,
    score: Callable[[Candidate], tuple[float, str]],
    reference: Optional[Callable[[], tuple[float, str]]] = None,
    echo: Optional[Callable[[str], None]] = None,
) -> SearchReport:
    """Score every candidate of ``spec`` and choose the best: the highest score, the first on a tie.

    Args:
        spec (SearchSpec): The candidates, budget and split.
        score (Callable[[Candidate], tuple[float, str]]): Trains a candidate for the budget and returns its score
            on ``spec.split`` and the metric's name. It is the only place a candidate is evaluated.
        reference (Callable[[], tuple[float, str]], optional): Trains the student alone for the same budget and
            scores it the same way; reported beside the candidates, never chosen. Default: none.
        echo (Callable[[str], None], optional): Told each candidate's score as it comes. Default: silent.

    Returns:
        SearchReport: Every candidate and score, and the choice.

    Example:
        .. testcode::

            from composer_kd.run.search import Candidate, SearchSpec, run_search

            spec = SearchSpec([Candidate('kl', t, 1.0, 1.0) for t in (1.0, 2.0, 4.0)], '10ba')
            report = run_search(spec, lambda c: (1.0 - abs(c.temperature - 2.0), 'accuracy'))
            assert report.best.temperature == 2.0 and report.scores == [0.0, 1.0, -1.0]
    """
    started = time.perf_counter()
    scores, metric = [], spec.metric or ''
    for i, candidate in enumerate(spec.candidates):
        value, metric = score(candidate)
        scores.append(float(value))
        if echo is not None:
            echo(f'search {i + 1}/{len(spec.candidates)}: {candidate.describe()}: {spec.split} {percent(value)}')
    chosen = max(range(len(scores)), key=lambda i: (scores[i], -i))
    alone = None
    if reference is not None:
        alone, _ = reference()
    return SearchReport(
        split=spec.split,
        metric=metric,
        max_duration=str(spec.max_duration),
        candidates=list(spec.candidates),
        scores=scores,
        chosen=chosen,
        reference=None if alone is None else float(alone),
        seconds=time.perf_counter() - started,
    )


def check_split(spec: SearchSpec, splits: Sequence[str]) -> None:
    """Refuse a search whose split is not evaluated, or that leaves no other split to report on.

    Args:
        spec (SearchSpec): The search.
        splits (Sequence[str]): The run's evaluation splits.

    Raises:
        ValueError: Naming the splits there are.

    Example:
        .. testcode::

            from composer_kd.run.search import SearchSpec, check_split

            check_split(SearchSpec([], '10ba', 'val'), ['val', 'test'])
            try:
                check_split(SearchSpec([], '10ba', 'val'), ['val'])
            except ValueError as error:
                print(error)
    """
    if spec.split not in splits:
        raise ValueError(
            f'search[split]: {spec.split!r} is not an evaluation split (there are: {", ".join(splits) or "none"}); '
            "pass eval_data={'val': ..., 'test': ...}."
        )
    if len(splits) < 2:
        raise ValueError(
            f'search: the settings are chosen on {spec.split!r}, so the result must be reported on another split; '
            "pass eval_data={'val': ..., 'test': ...}."
        )
