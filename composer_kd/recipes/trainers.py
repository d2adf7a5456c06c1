"""The ``Trainer`` s of a recipe run, and how its models are evaluated: every trainer gets the recipe's seed,
precision, device and intervals, and fresh loaders that give each the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

from composer import Trainer
from composer.core import Callback
from composer.loggers import LoggerDestination
from composer.models import ComposerModel
from composer.utils import reproducibility
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from composer_kd.recipes.components import (
    build_component,
    build_compression,
    build_distillation,
    build_recipe_optimizer,
    build_task_distillations,
)
from composer_kd.recipes.datasets import DataBundle
from composer_kd.recipes.loader import RecipeError
from composer_kd.recipes.models import build_model
from composer_kd.recipes.run_folder import STUDENT_FOLDER
from composer_kd.recipes.schema import ComponentSpec, OptimizerSpec, Recipe
from composer_kd.run.reporting import evaluate_model
from composer_kd.run.training import make_trainer

__all__ = [
    'LoggerFactory',
    'build_student',
    'build_student_alone',
    'build_trainer',
    'eval_splits',
    'evaluate',
    'has_batch_norm',
    'no_loggers',
]

#: Gives the extra logger destinations of one trainer of a run, by role: ``'teacher 0'``, ``'student (distilled)'``
#: (or ``'student alone'`` when the recipe disables distillation), and ``'student alone'`` for the baseline.
LoggerFactory = Callable[[str], Sequence[LoggerDestination]]


def no_loggers(role: str) -> Sequence[LoggerDestination]:
    """The :data:`LoggerFactory` that adds no logger destination to any trainer.

    Args:
        role (str): The trainer's role, e.g. ``'teacher 0'``.

    Returns:
        Sequence[LoggerDestination]: None.

    Example:
        .. testcode::

            from composer_kd.recipes.trainers import no_loggers

            assert list(no_loggers('teacher 0')) == []
    """
    return ()


def eval_splits(recipe: Recipe, data: DataBundle) -> list[str]:
    """The splits a recipe evaluates: its ``data.eval_splits``, or the dataset's default.

    Args:
        recipe (Recipe): The recipe.
        data (DataBundle): Its data.

    Returns:
        list[str]: The split names, in order; the first is the headline's.
    """
    return list(recipe.data.eval_splits or data.default_eval_splits)


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer, which cannot train on a batch of one example.

    Example:
        .. testcode::

            import torch
            from composer_kd.recipes.trainers import has_batch_norm

            assert has_batch_norm(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
            assert not has_batch_norm(torch.nn.Linear(4, 2))
    """
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _drop_last(recipe: Recipe, model: nn.Module, data: DataBundle, key: str) -> bool:
    """``data.drop_last``, or by default whether ``model`` has BatchNorm; refuse a last batch of one under it."""
    batch_norm = has_batch_norm(model)
    if recipe.data.drop_last is not None:
        drop = recipe.data.drop_last
    else:
        drop = batch_norm
    if drop or not batch_norm or data.labelled_per_batch is not None:
        return drop
    examples = len(data.train)  # type: ignore[arg-type]
    if examples % data.batch_size == 1:
        who = 'the student' if key == 'recipe' else f'teacher {key.split(".")[1]}'
        raise RecipeError(
            'recipe',
            [
                f'data.drop_last: false leaves a last training batch of one example ({examples} = '
                f'{examples // data.batch_size} x {data.batch_size} + 1), and the BatchNorm layers of {who} cannot '
                'train on one; set data.drop_last: true (or leave it out), or change data.batch_size'
            ],
        )
    return drop


def build_trainer(
    recipe: Recipe,
    model: ComposerModel,
    data: DataBundle,
    *,
    max_duration: str,
    optimizer: OptimizerSpec,
    scheduler: Optional[ComponentSpec],
    algorithms: Sequence[Any] = (),
    loggers: Sequence[LoggerDestination] = (),
    callbacks: Sequence[Callback] = (),
    save_folder: Optional[str] = None,
    save_interval: Optional[str] = None,
    splits: Optional[Sequence[str]] = None,
    key: str = 'recipe',
    run_name: Optional[str] = None,
) -> Trainer:
    """An ordinary Composer ``Trainer`` for ``model`` on the recipe's data, with the recipe's settings.

    Args:
        recipe (Recipe): Supplies the seed, precision, device, eval interval and progress bar.
        model (ComposerModel): The model to train.
        data (DataBundle): The data; the trainer gets fresh loaders.
        max_duration (str): Training budget.
        optimizer (OptimizerSpec): The optimizer.
        scheduler (ComponentSpec, optional): A ``composer.optim`` scheduler.
        algorithms (Sequence): Composer algorithms, ``Distillation`` among them for a distilled student.
        loggers (Sequence[LoggerDestination]): Logger destinations.
        callbacks (Sequence[Callback]): Callbacks.
        save_folder (str, optional): Where checkpoints go. Default: none saved.
        save_interval (str, optional): How often. Default: the recipe's.
        splits (Sequence[str], optional): Splits to evaluate. Default: the recipe's.
        key (str, optional): The recipe key this trainer stands for, for error messages.
        run_name (str, optional): Composer's run name; with ``resume: true`` and a ``save_folder`` the trainer
            continues from the latest checkpoint there (Composer's autoresume). Default: Composer's.

    Returns:
        Trainer: Built, not yet fit.
    """
    splits = list(splits) if splits is not None else eval_splits(recipe, data)
    train_loader = data.train_loader(drop_last=_drop_last(recipe, model, data, key))
    microbatch = recipe.device_train_microbatch_size
    if microbatch is None and train_loader.batch_size is None:
        microbatch = data.batch_size  # a batch sampler hides the batch size from Composer
    schedulers = [] if scheduler is None else [build_component(scheduler, 'scheduler', f'{key}.scheduler')]
    return make_trainer(
        model,
        train_loader,
        max_duration=max_duration,
        optimizer=build_recipe_optimizer(optimizer, model, f'{key}.optimizer'),
        seed=recipe.seed,
        eval_dataloaders={split: data.eval_loader(split) for split in splits},
        eval_interval=recipe.eval_interval,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        device=recipe.device,
        precision=recipe.precision,
        progress_bar=recipe.progress_bar,
        save_folder=save_folder,
        schedulers=schedulers,
        device_train_microbatch_size=microbatch,
        save_interval=save_interval or recipe.save_interval,
        # An earlier run's checkpoints are never replaced unless the recipe says so (the checks refuse a folder
        # that is not empty; ``overwrite: true`` has the run's folders removed before it trains).
        save_overwrite=recipe.overwrite,
        autoresume=bool(recipe.resume and save_folder),
        run_name=(run_name or key) if recipe.resume and save_folder else None,
    )


def evaluate(
    recipe: Recipe, model: ComposerModel, data: DataBundle, splits: Sequence[str], device: Optional[str] = None
) -> dict[str, dict]:
    """Evaluate ``model`` on ``splits`` with a Composer ``Trainer``; ``{split: {metric: value}}``.

    ``device`` overrides the recipe's (an int8 model runs on the CPU only, in full precision).

    Args:
        recipe (Recipe): Supplies the device, precision and seed.
        model (ComposerModel): The model.
        data (DataBundle): The recipe's data.
        splits (Sequence[str]): The splits to evaluate on.
        device (str, optional): A device instead of the recipe's. Default: the recipe's.

    Returns:
        dict[str, dict]: Every metric of every split (see :func:`~composer_kd.run.reporting.evaluate_model`).
    """
    loaders = {split: data.eval_loader(split) for split in splits}
    precision = None if device == 'cpu' else recipe.precision
    return evaluate_model(model, loaders, device=device or recipe.device, precision=precision, seed=recipe.seed)


def build_student(
    recipe: Recipe,
    data: DataBundle,
    role: str,
    *,
    teachers: Optional[Sequence[ComposerModel]] = None,
    loggers: LoggerFactory = no_loggers,
    callbacks: Sequence[Callback] = (),
    main: bool = True,
    model: Optional[ComposerModel] = None,
    splits: Optional[Sequence[str]] = None,
) -> tuple[ComposerModel, Trainer]:
    """A fresh student and its trainer: distilled from ``teachers``, or alone without them.

    Every student of a run starts from the same weights (the recipe's seed is set just before it is built) and
    gets the same algorithms, compression, budget and optimizer; only ``Distillation`` tells them apart.

    Args:
        recipe (Recipe): The recipe.
        data (DataBundle): Its data.
        role (str): ``'student (distilled)'`` or ``'student alone'``, which ``loggers`` is asked about.
        teachers (Sequence[ComposerModel], optional): The teachers to distil from. Default: none, the student
            is trained alone.
        loggers (Callable[[str], Sequence[LoggerDestination]], optional): Extra logger destinations by role.
        callbacks (Sequence[Callback], optional): Extra callbacks.
        main (bool, optional): Whether this is the run's main trainer, which gets the recipe's loggers and
            checkpoints. Default: ``True``.
        model (ComposerModel, optional): The student, built already (by :func:`build_model` right after seeding
            the recipe's seed, as here). Default: ``None``, built here.
        splits (Sequence[str], optional): The splits its trainer evaluates during training. Default: the
            recipe's (an empty list: none).

    Returns:
        tuple[ComposerModel, Trainer]: The student and its trainer, not yet fit.

    Raises:
        RecipeError: If a component refuses its arguments, or a feature pair names no module of the models.

    Example:
        .. testcode::

            from composer_kd.recipes import load_recipe
            from composer_kd.recipes.datasets import build_data
            from composer_kd.recipes.trainers import build_student, eval_splits

            recipe = load_recipe('digits', ['max_duration=2ba', 'progress_bar=false', 'device=cpu'])
            data = build_data(recipe.data, recipe.seed)
            student, trainer = build_student(recipe, data, 'student alone', main=False)
            trainer.fit()
            assert eval_splits(recipe, data) == ['val'] and int(trainer.state.timestamp.batch) == 2
    """
    if model is None:
        reproducibility.seed_all(recipe.seed)
        model = build_model(recipe.student, data.task)
    student = model
    algorithms = [build_component(spec, 'algorithm', f'algorithms.{i}') for i, spec in enumerate(recipe.algorithms)]
    algorithms += build_compression(recipe, data.task, student)
    if teachers is not None:
        if recipe.distillation.tasks:
            algorithms += build_task_distillations(recipe, teachers)
        else:
            algorithms.append(build_distillation(recipe, teachers))
    recipe_loggers = (
        [build_component(spec, 'logger', f'loggers.{i}') for i, spec in enumerate(recipe.loggers)] if main else []
    )
    try:
        trainer = build_trainer(
            recipe,
            student,
            data,
            max_duration=recipe.max_duration,
            optimizer=recipe.optimizer,
            scheduler=recipe.scheduler,
            algorithms=algorithms,
            loggers=[*recipe_loggers, *loggers(role)],
            callbacks=callbacks,
            save_folder=os.path.join(recipe.save_folder, STUDENT_FOLDER) if recipe.save_folder and main else None,
            splits=splits,
            run_name=f'{recipe.name}-student',
        )
    except ValueError as e:
        # Feature pairs' module paths are resolved when the trainer starts (Event.INIT).
        if teachers is None or not recipe.distillation.feature_pairs:
            raise
        raise RecipeError('recipe', [f'distillation.feature_pairs: {e}']) from e
    return student, trainer


def build_student_alone(
    recipe: Recipe,
    data: DataBundle,
    loggers: LoggerFactory = no_loggers,
    callbacks: Sequence[Callback] = (),
    main: bool = False,
) -> tuple[ComposerModel, Trainer]:
    """The student trained without teachers: the same initialization, batches, budget and settings.

    Args:
        recipe (Recipe): The recipe.
        data (DataBundle): Its data.
        loggers (Callable[[str], Sequence[LoggerDestination]], optional): Extra logger destinations by role.
        callbacks (Sequence[Callback], optional): Extra callbacks.
        main (bool, optional): Whether this is the run's main trainer (the recipe disables distillation), which
            gets the recipe's loggers and checkpoints. Default: ``False``, a baseline beside a distilled student.

    Returns:
        tuple[ComposerModel, Trainer]: The fresh student and its trainer, not yet fit.
    """
    return build_student(recipe, data, 'student alone', loggers=loggers, callbacks=callbacks, main=main)
