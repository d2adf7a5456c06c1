"""What a distillation run reports, and the fit that produces the report: shared by :func:`composer_kd.distill`
and recipe runs.

:func:`fit_and_report` fits a distilled student's trainer, evaluates the teachers and the student, trains the
student alone when asked (same start, batches, budget and seed), times both models' inference, and returns a
:class:`RunSummary`; :func:`format_summary` prints it as plain-text tables, readable in a terminal, a log file or
a CI transcript alike.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from composer import Trainer
from composer.core import Evaluator
from composer.models import ComposerModel
from composer.utils import reproducibility
from torch import nn
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from composer_kd.models.speed import first_examples, measure_speedup
from composer_kd.run.training import quiet_plumbing

__all__ = [
    'CHANCE_SHARE',
    'SPEED_EXAMPLES',
    'ModelReport',
    'RunSummary',
    'TeacherEntry',
    'WeakTeacherWarning',
    'chance_levels',
    'teacher_warnings',
    'count_parameters',
    'distillation_ratio',
    'evaluate_model',
    'fit_and_report',
    'format_summary',
    'format_table',
    'LOWER_IS_BETTER',
    'metric_text',
    'percent',
]

#: How many examples of the first evaluation batch the inference speed-up is timed on, and how many timings.
SPEED_EXAMPLES = 64
_SPEED_REPEATS = 10

#: A teacher's accuracy counts as chance level when it has gone no further than this share of the way from
#: chance (one over its number of classes) to 100%: 55% on two classes, 19% on ten.
CHANCE_SHARE = 0.1


#: Metrics where lower is better (losses, perplexity), shown as plain numbers; every other metric is taken to be a
#: fraction where higher is better (accuracy), shown as a percentage.
LOWER_IS_BETTER = frozenset({'LanguageCrossEntropy', 'LanguagePerplexity'})


def _better(metric: str, a: float, b: float) -> bool:
    """Whether ``a`` is strictly better than ``b`` on ``metric``."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def metric_text(metric: str, value: Optional[float]) -> str:
    """``value`` of ``metric`` as a run's summary shows it: a percentage, or for a loss a number.

    Example:
        .. testcode::

            from composer_kd.run.reporting import metric_text

            assert metric_text('accuracy', 0.5) == '50.00%' and metric_text('LanguageCrossEntropy', 2.0) == '2.0000'
    """
    if metric in LOWER_IS_BETTER:
        return '-' if value is None else f'{value:.4f}'
    return percent(value)


class WeakTeacherWarning(UserWarning):
    """A teacher evaluated at chance level, or below the student trained alone: it has little to teach."""


def distillation_ratio(
    teacher: float, alone: float, distilled: float, lower_is_better: bool = False
) -> Optional[float]:
    """``(distilled - alone) / (teacher - alone)``: the share of the teacher's lead the distilled student closed.

    1 means the distilled student matches the teacher, 0 that distillation gave nothing, a negative value that
    it hurt. Undefined (``None``) when the teacher is no better than the student alone.

    Args:
        teacher (float): The teacher's metric.
        alone (float): The student trained alone's.
        distilled (float): The distilled student's.
        lower_is_better (bool, optional): For a loss: the teacher beats the student by being lower. Default:
            ``False``.

    Returns:
        float | None: The ratio, or ``None`` when the teacher does not beat the student alone.

    Example:
        .. testcode::

            from composer_kd.run.reporting import distillation_ratio

            assert abs(distillation_ratio(teacher=0.9, alone=0.8, distilled=0.85) - 0.5) < 1e-12
    """
    if (teacher >= alone) if lower_is_better else (teacher <= alone):
        return None
    return (distilled - alone) / (teacher - alone)


def count_parameters(model: nn.Module) -> int:
    """The number of parameters in ``model``.

    Args:
        model (nn.Module): Any module.

    Returns:
        int: The number of elements of all its parameters.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.reporting import count_parameters

            assert count_parameters(torch.nn.Linear(4, 2)) == 10
    """
    return sum(p.numel() for p in model.parameters())


@dataclass
class ModelReport:
    """One model of a run.

    Attributes:
        role (str): ``'teacher 0'``, ``'student (distilled)'`` or ``'student alone'``.
        description (str): What the model is.
        parameters (int): Its parameter count.
        metrics (dict[str, dict[str, float]]): ``{split: {metric: value}}`` at the end.
        train_seconds (float, optional): Wall time of its training in this run; ``None`` if not trained here.
        checkpoint (str, optional): Its last checkpoint written in this run.
    """

    role: str
    description: str
    parameters: int
    metrics: dict[str, dict[str, float]]
    train_seconds: Optional[float] = None
    checkpoint: Optional[str] = None


@dataclass
class RunSummary:
    """What a run produced.

    Attributes:
        recipe (str): The recipe's name; ``'distill()'`` for a run of :func:`composer_kd.distill`.
        models (list[ModelReport]): Teachers, then the student(s).
        split (str): The split the headline metric comes from.
        metric (str): The headline metric's name.
        ratio (float, optional): The distillation ratio on the headline metric, when the student alone was
            trained too.
        wall_seconds (float): Wall time of the whole run.
        ratios (dict[str, float]): The distillation ratio on every metric of the headline split where it is
            defined (e.g. one per task of a multi-task student), against the best teacher that has the metric.
        inference (dict[str, float]): Teacher 0's and the student's inference time per example and the
            ``speedup`` (see :func:`~composer_kd.models.speed.measure_speedup`); empty when not measured.
        warnings (list[str]): What looks wrong with the run: a teacher at chance level or below the student
            alone, and why a distillation ratio is then omitted (see :func:`teacher_warnings`).
        search (SearchReport, optional): When the distillation settings were chosen on validation data (see
            :mod:`composer_kd.run.search`): every candidate tried, its score, and the choice. Default: ``None``.
    """

    recipe: str
    models: list[ModelReport]
    split: str
    metric: str
    ratio: Optional[float] = None
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    inference: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    search: Optional[Any] = None

    def __str__(self) -> str:
        return format_summary(self)

    @property
    def speedup(self) -> Optional[float]:
        """How many times faster the student's inference is than teacher 0's, if it was measured."""
        return self.inference.get('speedup')

    def value(self, role: str, metric: Optional[str] = None) -> Optional[float]:
        """The headline metric (or ``metric``, on the headline split) of the model with ``role``, if it has one."""
        for report in self.models:
            if report.role == role:
                return report.metrics.get(self.split, {}).get(metric or self.metric)
        return None


@dataclass
class TeacherEntry:
    """A teacher as a run reports it.

    Attributes:
        model (ComposerModel): The teacher, in a form a Composer ``Trainer`` evaluates (its own metrics).
        description (str): What it is.
        train_seconds (float, optional): Wall time of its training in this run; ``None`` if not trained here.
        checkpoint (str, optional): Its last checkpoint written in this run.
        evaluated (bool): Whether to evaluate it; a teacher that cannot be (it has no metrics) is reported
            with its size only.
    """

    model: nn.Module
    description: str
    train_seconds: Optional[float] = None
    checkpoint: Optional[str] = None
    evaluated: bool = True


def _ratios(summary: RunSummary, n_teachers: int) -> dict[str, float]:
    """The distillation ratio on every headline-split metric of the students, against the best teacher on it."""
    ratios = {}
    students = [m for m in summary.models if m.role.startswith('student')]
    metrics = dict.fromkeys(name for m in students for name in m.metrics.get(summary.split, {}))
    for metric in metrics:
        teacher_values = [summary.value(f'teacher {i}', metric) for i in range(n_teachers)]
        pick = min if metric in LOWER_IS_BETTER else max
        best = pick((v for v in teacher_values if v is not None), default=None)
        alone, distilled = summary.value('student alone', metric), summary.value('student (distilled)', metric)
        if best is not None and alone is not None and distilled is not None:
            ratio = distillation_ratio(best, alone, distilled, lower_is_better=metric in LOWER_IS_BETTER)
            if ratio is not None:
                ratios[metric] = ratio
    return ratios


def chance_levels(model: nn.Module) -> dict[str, float]:
    """The accuracy of random guessing for each accuracy metric of ``model``: ``{metric name: chance}``.

    Read from the model's own evaluation metrics (a ``ComposerModel``'s ``get_metrics(is_train=False)``): a
    multiclass accuracy over ``k`` classes (top-1) has chance ``1 / k``, a binary accuracy ``1 / 2``. Other metrics
    have no chance level and are left out, as is every metric of a model that is no ``ComposerModel``.

    Args:
        model (nn.Module): A model as a run evaluates it.

    Returns:
        dict[str, float]: The chance level of each accuracy metric, by the name its results carry.

    Example:
        .. testcode::

            import torch
            from composer.models import ComposerClassifier
            from composer_kd.run.reporting import chance_levels

            model = ComposerClassifier(torch.nn.Linear(4, 5), num_classes=5)
            assert chance_levels(model) == {'MulticlassAccuracy': 0.2}
    """
    get_metrics = getattr(model, 'get_metrics', None)
    if not callable(get_metrics):
        return {}
    levels = {}
    for name, metric in get_metrics(is_train=False).items():
        if isinstance(metric, MulticlassAccuracy) and metric.num_classes:
            levels[name] = min(1.0, (getattr(metric, 'top_k', 1) or 1) / metric.num_classes)
        elif isinstance(metric, BinaryAccuracy):
            levels[name] = 0.5
    return levels


def teacher_warnings(summary: RunSummary, chances: Sequence[Mapping[str, float]]) -> list[str]:
    """What a run's teachers' evaluation says is wrong with them, and why a distillation ratio is left out.

    On the headline split: a teacher whose accuracy is at chance level (no more than :data:`CHANCE_SHARE` of the
    way from chance to 100%: an untrained teacher, a newly initialized head) or below the student trained alone
    has nothing to teach; and where the student alone was trained but a metric has no distillation ratio, the
    reason: the best teacher is not above the student alone, so ``(distilled - alone) / (teacher - alone)``
    means nothing.

    Args:
        summary (RunSummary): The run's report, with its models' metrics.
        chances (Sequence[Mapping[str, float]]): For teacher ``i``, the chance level of each of its metrics
            (see :func:`chance_levels`); empty where unknown.

    Returns:
        list[str]: One line per finding, empty when the teachers look fine.

    Example:
        .. testcode::

            from composer_kd.run.reporting import ModelReport, RunSummary, teacher_warnings

            models = [
                ModelReport('teacher 0', 'cnn', 1000, {'val': {'accuracy': 0.12}}),
                ModelReport('student (distilled)', 'mlp', 100, {'val': {'accuracy': 0.7}}),
                ModelReport('student alone', 'mlp', 100, {'val': {'accuracy': 0.8}}),
            ]
            found = teacher_warnings(RunSummary('digits', models, 'val', 'accuracy'), [{'accuracy': 0.1}])
            assert found[0].startswith('teacher 0 is at chance level')
            assert found[1].startswith('teacher 0 is weaker than the student trained alone')
            assert found[2].startswith('distillation ratio on val accuracy omitted')
    """
    split, found = summary.split, []
    teachers = [m for m in summary.models if m.role.startswith('teacher')]
    for i, teacher in enumerate(teachers):
        chance = chances[i] if i < len(chances) else {}
        for name, value in teacher.metrics.get(split, {}).items():
            level = chance.get(name)
            if level is not None and value <= level + CHANCE_SHARE * (1 - level):
                found.append(
                    f'{teacher.role} is at chance level: {split} {name} {percent(value)}, where guessing gives '
                    f'{percent(level)}; it has nothing to teach (untrained, or a newly initialized head?): train it '
                    'first, or load its trained weights'
                )
            alone = summary.value('student alone', name)
            if alone is not None and _better(name, alone, value):
                found.append(
                    f'{teacher.role} is weaker than the student trained alone: {split} {name} '
                    f'{metric_text(name, value)} against {metric_text(name, alone)}; distilling from it pulls the '
                    'student towards worse answers: train it longer, or use a better teacher'
                )
    return found + _omitted_ratios(summary, teachers)


def _omitted_ratios(summary: RunSummary, teachers: Sequence[ModelReport]) -> list[str]:
    """Why each headline-split metric that both students have lacks a distillation ratio: its best teacher is not
    better than the student alone."""
    split, found = summary.split, []
    students = [m for m in summary.models if m.role.startswith('student')]
    metrics = dict.fromkeys(name for m in students for name in m.metrics.get(split, {}))
    for name in metrics:
        alone, distilled = summary.value('student alone', name), summary.value('student (distilled)', name)
        pick = min if name in LOWER_IS_BETTER else max
        best = pick((v for t in teachers if (v := t.metrics.get(split, {}).get(name)) is not None), default=None)
        if None in (alone, distilled, best) or name in summary.ratios:
            continue
        found.append(
            f'distillation ratio on {split} {name} omitted: (distilled - alone) / (teacher - alone) means nothing '
            f'when the best teacher ({metric_text(name, best)}) is not better than the student alone '
            f'({metric_text(name, alone)})'
        )
    return found


def fit_and_report(
    name: str,
    student: ComposerModel,
    trainer: Trainer,
    evaluate: Callable[[nn.Module], dict[str, dict[str, float]]],
    *,
    seed: int,
    teachers: Sequence[TeacherEntry] = (),
    student_description: str = '',
    distilled: bool = True,
    student_alone: Optional[Callable[[], tuple[ComposerModel, Trainer]]] = None,
    student_checkpoint: Callable[[], Optional[str]] = lambda: None,
    speed_batch: Any = None,
    started: Optional[float] = None,
    before_evaluation: Callable[[ComposerModel], None] = lambda student: None,
    export: Callable[[str, ComposerModel], list[ModelReport]] = lambda role, student: [],
    announce: Callable[[str], None] = lambda role: None,
) -> RunSummary:
    """Fit the student's trainer, then evaluate every model and report: the core of every run.

    The global random state is reset to ``seed`` right before each student's fit, so the distilled student and
    the student alone start from the same state whatever ran before (teacher training, evaluation).

    A teacher evaluated at chance level or below the student alone is reported in the summary's ``warnings``
    (see :func:`teacher_warnings`), which also say why a distillation ratio is omitted, and each is issued as a
    :class:`WeakTeacherWarning`.

    Args:
        name (str): The run's name in the summary.
        student (ComposerModel): The student ``trainer`` trains.
        trainer (Trainer): Its trainer, built and not yet fit; closed at the end.
        evaluate (Callable): Maps a model to ``{split: {metric: value}}``; the first split is the headline's.
        seed (int): The seed of every student's fit.
        teachers (Sequence[TeacherEntry], optional): The teachers to evaluate and report.
        student_description (str, optional): What the student is.
        distilled (bool, optional): Whether ``trainer`` distils (the student's role is then
            ``'student (distilled)'``, else ``'student alone'``). Default: ``True``.
        student_alone (Callable, optional): Builds the student alone and its trainer, for the comparison;
            called after the distilled fit. Default: none, no comparison.
        student_checkpoint (Callable, optional): Gives the student's last checkpoint after its fit.
        speed_batch (Any, optional): A batch on which teacher 0's and the student's inference are timed.
            Default: ``None``, not timed.
        started (float, optional): ``time.perf_counter()`` when the run began. Default: now.
        before_evaluation (Callable, optional): Called with each trained student before it is evaluated (e.g. to
            fix a quantization-aware student's ranges). Default: nothing.
        export (Callable, optional): Called with each student's role and model after its evaluation; the reports
            it returns (e.g. of an int8 export) follow the student's. Default: none.
        announce (Callable, optional): Called with a student's role right before its fit (e.g. to say which
            model the progress bar that follows trains). Default: nothing.

    Returns:
        RunSummary: Every model's parameters, metrics and training time, the ratios and the speed-up.
    """
    start = time.perf_counter() if started is None else started
    role = 'student (distilled)' if distilled else 'student alone'
    student_seconds = _timed_fit(trainer, seed, announce, role)
    reports = _teacher_reports(teachers, evaluate)
    reports.append(
        _student_report(
            role, student, student_description, student_seconds, evaluate, before_evaluation, student_checkpoint
        )
    )
    reports += export(role, student)
    if student_alone is not None and distilled:
        alone, alone_trainer = student_alone()
        alone_seconds = _timed_fit(alone_trainer, seed, announce, 'student alone')
        reports.append(
            _student_report('student alone', alone, student_description, alone_seconds, evaluate, before_evaluation)
        )
        alone_trainer.close()
        reports += export('student alone', alone)
    summary = _summary(name, reports, teachers)
    for line in summary.warnings:
        warnings.warn(line, WeakTeacherWarning, stacklevel=2)
    if speed_batch is not None and teachers:
        batch = first_examples(speed_batch, SPEED_EXAMPLES)
        summary.inference = measure_speedup(teachers[0].model, student, batch, repeats=_SPEED_REPEATS, rounds=2)
    trainer.close()
    summary.wall_seconds = time.perf_counter() - start
    return summary


def _teacher_reports(
    teachers: Sequence[TeacherEntry], evaluate: Callable[[nn.Module], dict[str, dict[str, float]]]
) -> list[ModelReport]:
    """Each teacher's report, ``'teacher 0'`` first; a teacher that cannot be evaluated has no metrics."""
    return [
        ModelReport(
            role=f'teacher {i}',
            description=entry.description,
            parameters=count_parameters(entry.model),
            metrics=evaluate(entry.model) if entry.evaluated else {},
            train_seconds=entry.train_seconds,
            checkpoint=entry.checkpoint,
        )
        for i, entry in enumerate(teachers)
    ]


def _timed_fit(trainer: Trainer, seed: int, announce: Callable[[str], None], role: str) -> float:
    """Fit the trainer of the student with ``role`` from the global random state of ``seed``; the seconds it took."""
    reproducibility.seed_all(seed)
    started = time.perf_counter()
    announce(role)
    with quiet_plumbing():
        trainer.fit()
    return time.perf_counter() - started


def _student_report(
    role: str,
    student: ComposerModel,
    description: str,
    train_seconds: float,
    evaluate: Callable[[nn.Module], dict[str, dict[str, float]]],
    before_evaluation: Callable[[ComposerModel], None],
    checkpoint: Callable[[], Optional[str]] = lambda: None,
) -> ModelReport:
    """A trained student's report, evaluated once ``before_evaluation`` has seen it."""
    before_evaluation(student)
    return ModelReport(
        role=role,
        description=description,
        parameters=count_parameters(student),
        metrics=evaluate(student),
        train_seconds=train_seconds,
        checkpoint=checkpoint(),
    )


def _summary(name: str, reports: list[ModelReport], teachers: Sequence[TeacherEntry]) -> RunSummary:
    """The run's summary: its headline (the distilled student's first split and metric), the distillation
    ratios, and the warnings about its teachers."""
    headline = reports[len(teachers)].metrics  # the distilled student's (or, without distillation, the student's)
    split = next(iter(headline), '')
    metric = next(iter(headline.get(split, {})), '')
    summary = RunSummary(name, reports, split, metric)
    summary.ratios = _ratios(summary, len(teachers))
    summary.ratio = summary.ratios.get(metric)
    chances = [chance_levels(entry.model) if entry.evaluated else {} for entry in teachers]
    summary.warnings = teacher_warnings(summary, chances)
    return summary


def evaluate_model(
    model: ComposerModel,
    dataloaders: Mapping[str, Any],
    *,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    seed: int = 17,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on each named loader with a Composer ``Trainer``; ``{split: {metric: value}}``.

    Args:
        model (ComposerModel): The model; its own validation metrics are computed.
        dataloaders (Mapping[str, DataLoader | DataSpec]): The evaluation data by split name.
        device (str, optional): Composer device. Default: the accelerator if any.
        precision (str, optional): Composer precision. Default: the device's.
        seed (int, optional): The trainer's seed. Default: ``17``.

    Returns:
        dict[str, dict[str, float]]: Every metric of every split; ``{}`` when there is no split.

    Example:
        .. testcode::

            import torch
            from composer.models import ComposerClassifier
            from torch.utils.data import DataLoader, TensorDataset
            from composer_kd.run.reporting import evaluate_model

            model = ComposerClassifier(torch.nn.Linear(4, 3), num_classes=3)
            data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
            results = evaluate_model(model, {'val': data}, device='cpu')
            assert list(results) == ['val'] and 0.0 <= results['val']['MulticlassAccuracy'] <= 1.0
    """
    if not dataloaders:
        return {}
    with quiet_plumbing():  # no optimizer: this trainer only evaluates
        trainer = Trainer(
            model=model,
            eval_dataloader=[Evaluator(label=split, dataloader=loader) for split, loader in dataloaders.items()],
            progress_bar=False,
            log_to_console=False,
            precision=precision,
            device=device,
            seed=seed,
        )
        trainer.eval()
    results = {
        split: {name: float(metric.compute()) for name, metric in trainer.state.eval_metrics[split].items()}
        for split in dataloaders
    }
    trainer.close()
    return results


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns aligned with spaces, a rule under the headers; columns listed in ``right`` are right-aligned.

    Example:
        .. testcode::

            from composer_kd.run.reporting import format_table

            print(format_table(['model', 'accuracy'], [['teacher', '98.1%']], right=[1]))
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return '  '.join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    return '\n'.join([line(headers), '  '.join('-' * w for w in widths), *(line(r) for r in rows)])


def percent(value: Optional[float], digits: int = 2) -> str:
    """``0.9812`` as ``'98.12%'``; ``'-'`` for ``None``.

    Args:
        value (float, optional): A fraction.
        digits (int, optional): Digits after the decimal point. Default: ``2``.

    Returns:
        str: The percentage.

    Example:
        .. testcode::

            from composer_kd.run.reporting import percent

            assert percent(0.9812) == '98.12%' and percent(None) == '-'
    """
    return '-' if value is None else f'{100 * value:.{digits}f}%'


def _seconds(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.1f} s'


def _models_table(models: Sequence[ModelReport]) -> str:
    """One row per model: its size, every metric of every split, and its training time."""
    splits = list(dict.fromkeys(split for m in models for split in m.metrics))
    metrics = list(
        dict.fromkeys((split, name) for m in models for split in splits for name in m.metrics.get(split, {}))
    )
    headers = ['model', 'architecture', 'parameters', *(f'{split} {name}' for split, name in metrics), 'train time']
    rows = [
        [
            m.role,
            m.description,
            f'{m.parameters:,}',
            *(metric_text(name, m.metrics.get(split, {}).get(name)) for split, name in metrics),
            _seconds(m.train_seconds),
        ]
        for m in models
    ]
    return format_table(headers, rows, right=range(2, len(headers)))


def _savings(summary: RunSummary) -> list[str]:
    """How many times fewer parameters the student has than teacher 0, and how much faster it answers."""
    lines = []
    teachers = [m for m in summary.models if m.role.startswith('teacher')]
    students = [m for m in summary.models if m.role.startswith('student')]
    if teachers and students and students[0].parameters:
        lines.append(
            f'the student has {teachers[0].parameters / students[0].parameters:.0f}x fewer parameters than teacher 0'
        )
    if summary.inference:
        speed = summary.inference
        lines.append(
            f'student inference speed-up over teacher 0: {speed["speedup"]:.1f}x '
            f'({speed["teacher_us_per_example"]:.2f} vs {speed["student_us_per_example"]:.2f} µs per example)'
        )
    return lines


def format_summary(summary: RunSummary) -> str:
    """The end-of-run summary of ``composer-kd train`` and ``distill()``: every model's size, metrics and time.

    Below the table come the distillation ratios, the warnings about the teachers (a teacher at chance level or
    below the student alone, and why a ratio is then omitted), the parameter and inference speed-up ratios, the
    checkpoints, the run's notes, the settings search (every candidate and its validation score) and its wall
    time.

    Args:
        summary (RunSummary): What the run produced.

    Returns:
        str: The summary, several lines.

    Example:
        .. testcode::

            from composer_kd.run.reporting import ModelReport, RunSummary, format_summary

            teacher = ModelReport('teacher 0', 'cnn', 1000, {'val': {'accuracy': 0.9}})
            student = ModelReport('student (distilled)', 'mlp', 100, {'val': {'accuracy': 0.85}})
            print(format_summary(RunSummary('digits', [teacher, student], 'val', 'accuracy')))
    """
    # A recipe's name, or the function that ran (distill()).
    title = summary.recipe if summary.recipe.endswith('()') else f'recipe {summary.recipe}'
    lines = [f'Summary of {title}', _models_table(summary.models)]
    ratios = summary.ratios or ({summary.metric: summary.ratio} if summary.ratio is not None else {})
    for metric, ratio in ratios.items():
        lines.append(
            f'distillation ratio (distilled - alone) / (teacher - alone) on {summary.split} {metric}: {ratio:.2f}'
        )
    lines.extend(f'warning: {line}' for line in summary.warnings)
    lines.extend(_savings(summary))
    for m in summary.models:
        if m.checkpoint:
            lines.append(f'{m.role} checkpoint: {m.checkpoint}')
    lines.extend(summary.notes)
    if summary.search is not None:
        lines.append(str(summary.search))
    lines.append(f'wall time: {summary.wall_seconds:.1f} s')
    return '\n'.join(lines)
