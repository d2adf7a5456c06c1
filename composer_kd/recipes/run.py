"""Running a recipe: its teachers first, then its student through :func:`~composer_kd.run.reporting.fit_and_report`.

:class:`RecipeRun` trains the teachers the recipe trains first and then hands its trainers to
:func:`~composer_kd.run.reporting.fit_and_report`, the core :func:`composer_kd.distill` runs too; a student with a
``compression`` section is also exported as it would be deployed. The report's classes live in
:mod:`composer_kd.run.reporting` and are importable from here as before.
"""

from __future__ import annotations

import copy
import glob
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from composer import Trainer
from composer.core import Callback
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
from composer_kd.recipes.datasets import DataBundle
from composer_kd.recipes.models import build_model
from composer_kd.recipes.quiet import quiet_libraries
from composer_kd.recipes.run_folder import STUDENT_FOLDER, clear_run_folder, interrupted_message, teacher_folder
from composer_kd.recipes.schema import ModelSpec, Recipe
from composer_kd.recipes.trainers import LoggerFactory, build_student, build_student_alone, eval_splits, evaluate
from composer_kd.run.reporting import (
    SPEED_EXAMPLES,
    ModelReport,
    RunSummary,
    TeacherEntry,
    count_parameters,
    distillation_ratio,
    fit_and_report,
)
from composer_kd.run.search import Candidate, SearchReport, run_search, search_spec
from composer_kd.run.training import quiet_plumbing

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
    'recipe_search',
    'with_settings',
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


def _loss_choice(name: str, options: Any) -> Union[str, dict[str, Any]]:
    return {'name': name, **dict(options)} if options else name


def recipe_search(recipe: Recipe) -> dict[str, Any]:
    """The recipe's ``search`` section as :func:`composer_kd.distill` takes ``search=`` (lists by setting).

    Args:
        recipe (Recipe): A recipe with a ``search`` section.

    Returns:
        dict[str, Any]: ``{'kd_loss': [...], 'temperature': [...], ..., 'split': ...}``; a setting the section
        leaves empty is left out (the ``distillation`` section's value is kept).

    Example:
        .. testcode::

            from composer_kd.recipes import load_recipe
            from composer_kd.recipes.run import recipe_search

            recipe = load_recipe('digits', ['search={temperatures: [2, 4], max_duration: 100ba}'])
            assert recipe_search(recipe) == {'split': 'val', 'temperature': [2.0, 4.0], 'max_duration': '100ba'}
    """
    s = recipe.search
    assert s is not None
    search: dict[str, Any] = {'split': s.split}
    if s.losses:
        search['kd_loss'] = [_loss_choice(loss.name, loss.options) for loss in s.losses]
    for key, values in (
        ('temperature', s.temperatures),
        ('kd_loss_weight', s.kd_loss_weights),
        ('org_loss_weight', s.org_loss_weights),
    ):
        if values:
            search[key] = [float(v) for v in values]
    if s.max_duration is not None:
        search['max_duration'] = s.max_duration
    return search


def with_settings(recipe: Recipe, candidate: Candidate, max_duration: Optional[str] = None) -> Recipe:
    """A copy of ``recipe`` distilling with ``candidate``'s loss, temperature and weights, and no search.

    Args:
        recipe (Recipe): The recipe.
        candidate (Candidate): The settings, with a loss given by name or ``{'name': ..., **options}``.
        max_duration (str, optional): A budget instead of the recipe's.

    Returns:
        Recipe: The copy.

    Example:
        .. testcode::

            from composer_kd.recipes import load_recipe
            from composer_kd.recipes.run import with_settings
            from composer_kd.run.search import Candidate

            recipe = with_settings(load_recipe('digits'), Candidate({'name': 'dkd', 'beta': 2.0}, 2.0, 1.0, 1.0))
            assert (recipe.distillation.loss, recipe.distillation.loss_options) == ('dkd', {'beta': 2.0})
    """
    variant = copy.deepcopy(recipe)
    d, loss = variant.distillation, candidate.kd_loss
    if isinstance(loss, str):
        d.loss, d.loss_options = loss, {}
    else:
        d.loss, d.loss_options = loss['name'], {k: v for k, v in loss.items() if k != 'name'}
    if candidate.temperature is not None:
        d.temperature = float(candidate.temperature)
    d.kd_loss_weight, d.org_loss_weight = float(candidate.kd_loss_weight), float(candidate.org_loss_weight)
    variant.search = None
    if max_duration is not None:
        variant.max_duration = max_duration
    return variant


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
        search (SearchReport, optional): After :meth:`fit`, with a ``search`` section: every candidate tried and
            its validation score; ``student`` and ``trainer`` are then the chosen candidate's.
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
    callbacks: list[Callback] = field(default_factory=list)
    search: Optional[SearchReport] = None
    resume_command: Optional[str] = None

    def train_teachers(self) -> None:
        """Fit the teachers the recipe trains first (once; a second call does nothing).

        On ``resume: true`` a teacher whose training finished in the run's folder is not trained again.
        """
        if self.teacher_seconds:
            return
        for trainer in self.teacher_trainers:
            if trainer is None:
                self.teacher_seconds.append(None)
                continue
            i = len(self.teacher_seconds)
            if self.recipe.resume and trainer.state.get_elapsed_duration() >= 1:
                print(f'Teacher {i}: its training finished in {self.recipe.save_folder}; not trained again.')
                self.teacher_seconds.append(0.0)
                continue
            start = time.perf_counter()
            self._announce(f'teacher {i}')
            with quiet_plumbing():
                trainer.fit()
            self.teacher_seconds.append(time.perf_counter() - start)

    def fit(self) -> RunSummary:
        """Train the teachers (those the recipe trains), then the student, then evaluate every model.

        With ``baseline: true`` the student is also trained alone (same initialization, batches, budget and
        seed) and the summary carries the distillation ratio. The student's run is :func:`fit_and_report`'s,
        as :func:`composer_kd.distill`'s is. With ``overwrite: true`` the checkpoints of the run ``save_folder``
        holds are removed first; on ``KeyboardInterrupt`` (Ctrl-C) the run says where its checkpoints are and how
        to resume it (``resume: true``), and the interruption goes on.

        Returns:
            RunSummary: Every model's parameters, metrics and training time, the ratios and the speed-up.
        """
        clear_run_folder(self.recipe)
        try:
            with quiet_libraries():
                return self._fit()
        except KeyboardInterrupt:
            print(interrupted_message(self.recipe, self.resume_command), file=sys.stderr, flush=True)
            raise

    def _fit(self) -> RunSummary:
        recipe, start = self.recipe, time.perf_counter()
        self.train_teachers()
        for teacher_trainer in self.teacher_trainers:
            if teacher_trainer is not None:
                teacher_trainer.close()
        splits = eval_splits(recipe, self.data)
        if recipe.search is not None and recipe.distillation.enabled:
            self.search = self._search()
            chosen = with_settings(recipe, self.search.best)
            self.trainer.close()
            self.student, self.trainer = build_student(
                chosen,
                self.data,
                'student (distilled)',
                teachers=self.teachers,
                loggers=self.loggers,
                callbacks=self.callbacks,
            )
            # The headline is the first split: one the settings were not chosen on.
            splits = [split for split in splits if split != self.search.split] + [self.search.split]
        teachers = [
            TeacherEntry(
                model=teacher,
                description=('trained here: ' if self.teacher_seconds[i] else '') + describe_model(spec),
                train_seconds=self.teacher_seconds[i],
                checkpoint=_latest_checkpoint(
                    os.path.join(recipe.save_folder, teacher_folder(i)) if recipe.save_folder else None
                ),
            )
            for i, (spec, teacher) in enumerate(zip(recipe.teachers, self.teachers, strict=True))
        ]
        student_alone = None
        if recipe.baseline and recipe.distillation.enabled:

            def student_alone() -> tuple[ComposerModel, Trainer]:
                return build_student_alone(recipe, self.data, self.loggers)

        if recipe.resume and self.trainer.state.get_elapsed_duration() >= 1:
            # The student's training finished before the run stopped: it is evaluated as it is (Composer refuses
            # to fit a trainer whose budget is spent).
            print(f'The student: its training finished in {recipe.save_folder}; not trained again.')
            self.trainer.fit = lambda *args, **kwargs: None  # type: ignore[method-assign]
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
                os.path.join(recipe.save_folder, STUDENT_FOLDER) if recipe.save_folder else None
            ),
            speed_batch=next(iter(self.data.eval_loader(splits[0]))) if splits else None,
            started=start,
            before_evaluation=self._freeze_observers,
            export=lambda role, student: self._export(role, student, splits, notes),
            announce=self._announce,
        )
        summary.notes = notes
        summary.search = self.search
        return summary

    def _announce(self, role: str) -> None:
        """Say which model the progress bar that follows trains (Composer labels them all 'train')."""
        if self.recipe.progress_bar:
            print(f'Training {role}:', flush=True)

    def _search(self) -> SearchReport:
        """Train a student for each candidate of the ``search`` section, score it on its split, choose.

        Every candidate's student starts from the recipe's initial weights and sees the same batches; its trainer
        evaluates nothing during training, and it is evaluated on the search's split only.
        """
        recipe, d = self.recipe, self.recipe.distillation
        spec = search_spec(
            recipe_search(recipe),
            kd_loss=_loss_choice(d.loss, d.loss_options),
            temperature=d.temperature,
            kd_loss_weight=d.kd_loss_weight,
            org_loss_weight=d.org_loss_weight,
            max_duration=recipe.max_duration,
        )

        def fit_and_score(variant: Recipe, teachers: Optional[list[ComposerModel]]) -> tuple[float, str]:
            student, trainer = build_student(variant, self.data, 'search', teachers=teachers, main=False, splits=[])
            reproducibility.seed_all(recipe.seed)
            trainer.fit()
            trainer.close()
            values = evaluate(variant, student, self.data, [spec.split])[spec.split]
            metric = next(iter(values))
            return values[metric], metric

        def score(candidate: Candidate) -> tuple[float, str]:
            return fit_and_score(with_settings(recipe, candidate, spec.max_duration), self.teachers)

        reference = None
        if recipe.baseline:

            def reference() -> tuple[float, str]:
                return fit_and_score(with_settings(recipe, spec.candidates[0], spec.max_duration), None)

        return run_search(spec, score, reference=reference)

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
