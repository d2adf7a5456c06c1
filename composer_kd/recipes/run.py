"""Running a built recipe: teachers first, then the student (and, if asked, the student alone), then a summary."""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from composer import Trainer
from composer.models import ComposerModel
from composer.utils import reproducibility

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

__all__ = ['ModelReport', 'RecipeRun', 'RunSummary', 'distillation_ratio']


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
        recipe (str): The recipe's name.
        models (list[ModelReport]): Teachers, then the student(s).
        split (str): The split the headline metric comes from.
        metric (str): The headline metric's name.
        ratio (float, optional): The distillation ratio on the headline metric, when the student alone was
            trained too.
        wall_seconds (float): Wall time of the whole run.
    """

    recipe: str
    models: list[ModelReport]
    split: str
    metric: str
    ratio: Optional[float] = None
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def value(self, role: str) -> Optional[float]:
        """The headline metric of the model with ``role``, if it has one."""
        for report in self.models:
            if report.role == role:
                return report.metrics.get(self.split, {}).get(self.metric)
        return None


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
        seed) and the summary carries the distillation ratio.

        Returns:
            RunSummary: Every model's parameters, metrics and training time.
        """
        recipe, start = self.recipe, time.perf_counter()
        self.train_teachers()
        # Teacher training consumed random numbers; give the student the state it would have had without it.
        reproducibility.seed_all(recipe.seed)
        student_start = time.perf_counter()
        self.trainer.fit()
        student_seconds = time.perf_counter() - student_start

        splits = eval_splits(recipe, self.data)
        reports = []
        for i, (spec, teacher) in enumerate(zip(recipe.teachers, self.teachers, strict=True)):
            folder = os.path.join(recipe.save_folder, f'teacher-{i}') if recipe.save_folder else None
            reports.append(
                ModelReport(
                    role=f'teacher {i}',
                    description=('trained here: ' if self.teacher_seconds[i] else '') + describe_model(spec),
                    parameters=count_parameters(teacher),
                    metrics=evaluate(recipe, teacher, self.data, splits),
                    train_seconds=self.teacher_seconds[i],
                    checkpoint=_latest_checkpoint(folder),
                )
            )
        distilled = recipe.distillation.enabled
        notes: list[str] = []
        role = 'student (distilled)' if distilled else 'student alone'
        self._freeze_observers(self.student)
        reports.append(
            ModelReport(
                role=role,
                description=describe_model(recipe.student) + describe_compression(recipe),
                parameters=count_parameters(self.student),
                metrics=evaluate(recipe, self.student, self.data, splits),
                train_seconds=student_seconds,
                checkpoint=_latest_checkpoint(
                    os.path.join(recipe.save_folder, 'student') if recipe.save_folder else None
                ),
            )
        )
        reports += self._export(role, self.student, splits, notes)
        if recipe.baseline and distilled:
            alone, trainer = build_student_alone(recipe, self.data, self.loggers)
            reproducibility.seed_all(recipe.seed)
            alone_start = time.perf_counter()
            trainer.fit()
            self._freeze_observers(alone)
            reports.append(
                ModelReport(
                    role='student alone',
                    description=describe_model(recipe.student) + describe_compression(recipe),
                    parameters=count_parameters(alone),
                    metrics=evaluate(recipe, alone, self.data, splits),
                    train_seconds=time.perf_counter() - alone_start,
                )
            )
            trainer.close()
            reports += self._export('student alone', alone, splits, notes)
        split = splits[0]
        metric = next(iter(reports[-1].metrics[split]))
        summary = RunSummary(recipe.name, reports, split, metric, notes=notes)
        teacher_values = [summary.value(f'teacher {i}') for i in range(len(self.teachers))]
        best_teacher = max((v for v in teacher_values if v is not None), default=None)
        alone_value, distilled_value = summary.value('student alone'), summary.value('student (distilled)')
        if None not in (best_teacher, alone_value, distilled_value):
            summary.ratio = distillation_ratio(best_teacher, alone_value, distilled_value)  # type: ignore[arg-type]
        for trainer in [*self.teacher_trainers, self.trainer]:
            if trainer is not None:
                trainer.close()
        summary.wall_seconds = time.perf_counter() - start
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
