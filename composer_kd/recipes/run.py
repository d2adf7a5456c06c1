"""Running a recipe: its teachers first, then its student through :func:`~composer_kd.reporting.fit_and_report`.

:class:`RecipeRun` trains the teachers the recipe trains first and then hands its trainers to
:func:`~composer_kd.reporting.fit_and_report`, the core :func:`composer_kd.distill` runs too; a student with a
``compression`` section is also exported as it would be deployed. The report's classes live in
:mod:`composer_kd.reporting` and are importable from here as before.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from composer import Trainer
from composer.models import ComposerModel

from composer_kd.compression import (
    convert_to_int8,
    make_pruning_permanent,
    model_size_bytes,
    prunable_modules,
    quantization_backend,
    sparsity,
)
from composer_kd.recipes.datasets import DataBundle
from composer_kd.recipes.models import build_model
from composer_kd.recipes.schema import ModelSpec, Recipe
from composer_kd.recipes.trainers import LoggerFactory, build_student_alone, eval_splits, evaluate
from composer_kd.reporting import (
    SPEED_EXAMPLES,
    ModelReport,
    RunSummary,
    TeacherEntry,
    count_parameters,
    distillation_ratio,
    fit_and_report,
)

__all__ = [
    'SPEED_EXAMPLES',
    'ModelReport',
    'RecipeRun',
    'RunSummary',
    'TeacherEntry',
    'describe_compression',
    'describe_model',
    'distillation_ratio',
    'fit_and_report',
]


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
