"""Running a distillation and reporting it: the core shared by recipe runs and :func:`composer_kd.distill`.

:func:`fit_and_report` fits a distilled student's trainer, evaluates the teachers and the student, trains the
student alone when asked (same start, batches, budget and seed), times both models' inference, and returns a
:class:`RunSummary`. :class:`RecipeRun` trains a recipe's teachers first and then hands its trainers to it.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from composer import Trainer
from composer.models import ComposerModel
from composer.utils import reproducibility
from torch import nn

from composer_kd.compression import (
    convert_to_int8,
    make_pruning_permanent,
    model_size_bytes,
    prunable_modules,
    quantization_backend,
    sparsity,
)
from composer_kd.recipes.build import LoggerFactory, build_student_alone, eval_splits, evaluate
from composer_kd.recipes.datasets import DataBundle
from composer_kd.recipes.models import build_model, count_parameters
from composer_kd.recipes.schema import ModelSpec, Recipe
from composer_kd.speed import first_examples, measure_speedup

__all__ = [
    'SPEED_EXAMPLES',
    'ModelReport',
    'RecipeRun',
    'RunSummary',
    'TeacherEntry',
    'distillation_ratio',
    'fit_and_report',
]

#: How many examples of the first evaluation batch the inference speed-up is timed on, and how many timings.
SPEED_EXAMPLES = 64
_SPEED_REPEATS = 10


def distillation_ratio(teacher: float, alone: float, distilled: float) -> Optional[float]:
    """``(distilled - alone) / (teacher - alone)``: the share of the teacher's lead the distilled student closed.

    1 means the distilled student matches the teacher, 0 that distillation gave nothing, a negative value that
    it hurt. Undefined (``None``) when the teacher is no better than the student alone.

    Example:
        .. testcode::

            from composer_kd.recipes.run import distillation_ratio

            assert abs(distillation_ratio(teacher=0.9, alone=0.8, distilled=0.85) - 0.5) < 1e-12
    """
    if teacher <= alone:
        return None
    return (distilled - alone) / (teacher - alone)


def describe_model(spec: ModelSpec) -> str:
    """A short description of a model section, e.g. ``'mlp [32]'`` or ``'huggingface google/bert...'``."""
    if spec.kind == 'mlp':
        text = f'mlp {list(spec.hidden)}'
    elif spec.kind == 'cnn':
        text = f'cnn {list(spec.channels)} + {list(spec.hidden)}'
    elif spec.kind == 'hf_config':
        # The first two config entries (for BERT: width and depth) tell the models of a recipe apart.
        text = f'{spec.name} ' + ', '.join(f'{k}={v}' for k, v in list(spec.kwargs.items())[:2])
    else:
        text = f'{spec.kind} {spec.name}'
    if spec.tasks:
        text += f' ({", ".join(spec.tasks)} head{"s" if len(spec.tasks) > 1 else ""})'
    return text + (f' from {spec.checkpoint}' if spec.checkpoint else '')


def describe_compression(recipe: Recipe) -> str:
    """The recipe's ``compression`` section in a few words, e.g. ``' + QAT x86 + pruned 50%'``; empty if none."""
    qat, pruning = recipe.compression.qat, recipe.compression.pruning
    text = f' + QAT {qat.backend}' if qat is not None else ''
    if pruning is not None:
        text += f' + pruned {100 * pruning.amount:g}%' + (' structured' if pruning.structured else '')
    return text


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
            ``speedup`` (see :func:`~composer_kd.speed.measure_speedup`); empty when not measured.
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

    def __str__(self) -> str:
        from composer_kd.recipes.report import format_summary  # the table module builds on this one

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
        best = max((v for v in teacher_values if v is not None), default=None)
        alone, distilled = summary.value('student alone', metric), summary.value('student (distilled)', metric)
        if best is not None and alone is not None and distilled is not None:
            ratio = distillation_ratio(best, alone, distilled)
            if ratio is not None:
                ratios[metric] = ratio
    return ratios


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
) -> RunSummary:
    """Fit the student's trainer, then evaluate every model and report: the core of every run.

    The global random state is reset to ``seed`` right before each student's fit, so the distilled student and
    the student alone start from the same state whatever ran before (teacher training, evaluation).

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

    Returns:
        RunSummary: Every model's parameters, metrics and training time, the ratios and the speed-up.
    """
    start = time.perf_counter() if started is None else started
    reproducibility.seed_all(seed)
    student_start = time.perf_counter()
    trainer.fit()
    student_seconds = time.perf_counter() - student_start

    reports = [
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
    role = 'student (distilled)' if distilled else 'student alone'
    before_evaluation(student)
    reports.append(
        ModelReport(
            role=role,
            description=student_description,
            parameters=count_parameters(student),
            metrics=evaluate(student),
            train_seconds=student_seconds,
            checkpoint=student_checkpoint(),
        )
    )
    reports += export(role, student)
    if student_alone is not None and distilled:
        alone, alone_trainer = student_alone()
        reproducibility.seed_all(seed)
        alone_start = time.perf_counter()
        alone_trainer.fit()
        before_evaluation(alone)
        reports.append(
            ModelReport(
                role='student alone',
                description=student_description,
                parameters=count_parameters(alone),
                metrics=evaluate(alone),
                train_seconds=time.perf_counter() - alone_start,
            )
        )
        alone_trainer.close()
        reports += export('student alone', alone)
    headline = reports[len(teachers)].metrics  # the distilled student's (or, without distillation, the student's)
    split = next(iter(headline), '')
    metric = next(iter(headline.get(split, {})), '')
    summary = RunSummary(name, reports, split, metric)
    summary.ratios = _ratios(summary, len(teachers))
    summary.ratio = summary.ratios.get(metric)
    if speed_batch is not None and teachers:
        batch = first_examples(speed_batch, SPEED_EXAMPLES)
        summary.inference = measure_speedup(teachers[0].model, student, batch, repeats=_SPEED_REPEATS, rounds=2)
    trainer.close()
    summary.wall_seconds = time.perf_counter() - start
    return summary


def _latest_checkpoint(folder: Optional[str]) -> Optional[str]:
    if not folder:
        return None
    found = sorted(glob.glob(os.path.join(folder, 'ep*-ba*-rank0.pt')), key=os.path.getmtime)
    return found[-1] if found else None


@dataclass
class RecipeRun:
    """Everything a recipe describes, built and ready: call :meth:`fit`.

    Attributes:
        recipe (Recipe): The recipe.
        data (DataBundle): Its data.
        student (ComposerModel): The student.
        teachers (list[ComposerModel]): The teachers, in the recipe's order.
        teacher_trainers (list[Trainer | None]): A trainer for each teacher the recipe trains first, else ``None``.
        trainer (Trainer): The student's trainer; it holds ``Distillation`` unless the recipe disables it.
        exported (dict[str, nn.Module]): After :meth:`fit`, with a ``compression`` section: each student by role,
            as it would be deployed (converted to int8, pruning made permanent).
    """

    recipe: Recipe
    data: DataBundle
    student: ComposerModel
    teachers: list[ComposerModel]
    teacher_trainers: list[Optional[Trainer]]
    trainer: Trainer
    loggers: LoggerFactory = field(default=lambda role: ())
    teacher_seconds: list[Optional[float]] = field(default_factory=list)
    exported: dict[str, torch.nn.Module] = field(default_factory=dict)

    def train_teachers(self) -> None:
        """Fit the teachers the recipe trains first (once; a second call does nothing)."""
        if self.teacher_seconds:
            return
        for trainer in self.teacher_trainers:
            if trainer is None:
                self.teacher_seconds.append(None)
                continue
            start = time.perf_counter()
            trainer.fit()
            self.teacher_seconds.append(time.perf_counter() - start)

    def fit(self) -> RunSummary:
        """Train the teachers (those the recipe trains), then the student, then evaluate every model.

        With ``baseline: true`` the student is also trained alone (same initialization, batches, budget and
        seed) and the summary carries the distillation ratio. The student's run is :func:`fit_and_report`'s,
        as :func:`composer_kd.distill`'s is.

        Returns:
            RunSummary: Every model's parameters, metrics and training time, the ratios and the speed-up.
        """
        recipe, start = self.recipe, time.perf_counter()
        self.train_teachers()
        for teacher_trainer in self.teacher_trainers:
            if teacher_trainer is not None:
                teacher_trainer.close()
        splits = eval_splits(recipe, self.data)
        teachers = [
            TeacherEntry(
                model=teacher,
                description=('trained here: ' if self.teacher_seconds[i] else '') + describe_model(spec),
                train_seconds=self.teacher_seconds[i],
                checkpoint=_latest_checkpoint(
                    os.path.join(recipe.save_folder, f'teacher-{i}') if recipe.save_folder else None
                ),
            )
            for i, (spec, teacher) in enumerate(zip(recipe.teachers, self.teachers, strict=True))
        ]
        student_alone = None
        if recipe.baseline and recipe.distillation.enabled:

            def student_alone() -> tuple[ComposerModel, Trainer]:
                return build_student_alone(recipe, self.data, self.loggers)

        notes: list[str] = []
        summary = fit_and_report(
            recipe.name,
            self.student,
            self.trainer,
            lambda model: evaluate(recipe, model, self.data, splits),
            seed=recipe.seed,
            teachers=teachers,
            student_description=describe_model(recipe.student) + describe_compression(recipe),
            distilled=recipe.distillation.enabled,
            student_alone=student_alone,
            student_checkpoint=lambda: _latest_checkpoint(
                os.path.join(recipe.save_folder, 'student') if recipe.save_folder else None
            ),
            speed_batch=next(iter(self.data.eval_loader(splits[0]))) if splits else None,
            started=start,
            before_evaluation=self._freeze_observers,
            export=lambda role, student: self._export(role, student, splits, notes),
        )
        summary.notes = notes
        return summary

    @staticmethod
    def _freeze_observers(student: ComposerModel) -> None:
        """Fix a quantization-aware student's ranges once trained, so that evaluating it cannot move them."""
        if quantization_backend(student) is not None:
            student.apply(torch.ao.quantization.disable_observer)

    def _export(self, role: str, student: ComposerModel, splits: list[str], notes: list[str]) -> list[ModelReport]:
        """Export a compressed student (int8, pruning made permanent), note its size or sparsity, evaluate int8."""
        recipe, qat, pruning = self.recipe, self.recipe.compression.qat, self.recipe.compression.pruning
        if qat is None and pruning is None:
            return []
        reports = []
        if qat is not None:
            exported = convert_to_int8(student)
            with torch.random.fork_rng():  # the float twin only gives the fp32 file size; it draws no training seed
                float_bytes = model_size_bytes(build_model(recipe.student, self.data.task))
            int8_bytes = model_size_bytes(exported)
            notes.append(
                f'{role}: state_dict {float_bytes:,} bytes in fp32, {int8_bytes:,} bytes in int8 '
                f'({float_bytes / int8_bytes:.2f}x smaller)'
            )
            reports.append(
                ModelReport(
                    role=f'{role} int8',
                    description=f'{describe_model(recipe.student)}{describe_compression(recipe)} -> int8 (CPU)',
                    parameters=count_parameters(student),
                    metrics=evaluate(recipe, exported, self.data, splits, device='cpu'),
                )
            )
        else:
            exported = make_pruning_permanent(student)
        if pruning is not None:
            layers = list(prunable_modules(student, None if pruning.modules is None else list(pruning.modules)))
            notes.append(
                f"{role}: {100 * sparsity(student, layers):.1f}% of the pruned layers' weights are zero "
                f'({", ".join(layers)}), {100 * sparsity(student):.1f}% of all Linear and Conv weights'
            )
        self.exported[role] = exported
        return reports
