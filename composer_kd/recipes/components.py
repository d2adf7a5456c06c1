"""The Composer objects a recipe's sections name: its algorithms, loggers, schedulers and optimizers, the
``Distillation`` (or one per task) its ``distillation`` section describes, and its ``compression`` algorithms.

A constructor's complaint becomes a :class:`~composer_kd.recipes.loader.RecipeError` naming the recipe key, so a
recipe that passed :func:`~composer_kd.recipes.validate.check_recipe` and still cannot be built says where.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from composer.models import ComposerModel

from composer_kd.compression import Pruning, QuantizationAwareTraining, prunable_modules
from composer_kd.distillation import Distillation
from composer_kd.losses import loss_from_name
from composer_kd.multitask import DistillationTask, task_distillations
from composer_kd.parts.features import FeaturePair
from composer_kd.parts.onpolicy import OnPolicy
from composer_kd.recipes.loader import RecipeError
from composer_kd.recipes.models import TaskInfo
from composer_kd.recipes.schema import ComponentSpec, OptimizerSpec, Recipe, ScheduleSpec
from composer_kd.recipes.tasks import task_teachers
from composer_kd.run.training import build_optimizer, composer_class
from composer_kd.schedules import Schedule, build_schedule
from composer_kd.window import time_or_fraction

__all__ = [
    'build_component',
    'build_compression',
    'build_distillation',
    'build_recipe_optimizer',
    'build_task_distillations',
]


def _refused(key: str, name: str, kwargs: dict[str, Any], error: Exception) -> RecipeError:
    # build_run names the recipe; here only the key is known.
    return RecipeError('recipe', [f'{key}: {name} refused {kwargs}: {error}'])


def build_component(spec: ComponentSpec, kind: str, key: str) -> Any:
    """The Composer algorithm, logger destination or scheduler ``spec`` names, built with its ``kwargs``.

    Args:
        spec (ComponentSpec): The class name and keyword arguments.
        kind (str): ``'algorithm'``, ``'logger'`` or ``'scheduler'``.
        key (str): The recipe key it comes from (``'algorithms.0'``), for the error message.

    Returns:
        Any: The object.

    Raises:
        RecipeError: If the constructor refuses the arguments (or a logger's optional package is missing).

    Example:
        .. testcode::

            from composer_kd.recipes.components import build_component
            from composer_kd.recipes.schema import ComponentSpec

            spec = ComponentSpec('LabelSmoothing', {'smoothing': 0.1})
            assert build_component(spec, 'algorithm', 'algorithms.0').smoothing == 0.1
    """
    cls, kwargs = composer_class(kind, spec.name), dict(spec.kwargs)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ImportError) as e:  # ImportError: a logger's optional package
        raise _refused(key, cls.__name__, kwargs, e) from e


def build_recipe_optimizer(spec: OptimizerSpec, model: ComposerModel, key: str) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names, over ``model``'s parameters (see
    :func:`~composer_kd.run.training.build_optimizer`).

    Args:
        spec (OptimizerSpec): The class name, learning rate, weight decay and other arguments.
        model (ComposerModel): The model it optimizes.
        key (str): The recipe key it comes from (``'optimizer'``), for the error message.

    Returns:
        torch.optim.Optimizer: The optimizer.

    Raises:
        RecipeError: If the optimizer refuses the arguments.

    Example:
        .. testcode::

            import torch
            from composer_kd.recipes.components import build_recipe_optimizer
            from composer_kd.recipes.schema import OptimizerSpec

            optimizer = build_recipe_optimizer(OptimizerSpec('SGD', lr=0.1), torch.nn.Linear(4, 2), 'optimizer')
            assert isinstance(optimizer, torch.optim.SGD)
    """
    kwargs = {'lr': spec.lr, 'weight_decay': spec.weight_decay, **dict(spec.kwargs)}
    try:
        return build_optimizer(spec.name, model, **kwargs)
    except (TypeError, ValueError) as e:
        raise _refused(key, spec.name, kwargs, e) from e


def _schedule(spec: ScheduleSpec) -> Schedule:
    start, end = time_or_fraction(spec.start), time_or_fraction(spec.end)
    return build_schedule(spec.kind, spec.start_value, spec.end_value, start=start, end=end)


def build_distillation(recipe: Recipe, teachers: Sequence[ComposerModel]) -> Distillation:
    """The ``Distillation`` algorithm the recipe's ``distillation`` section describes, over ``teachers``.

    Args:
        recipe (Recipe): The recipe.
        teachers (Sequence[ComposerModel]): The teachers, built (and trained or loaded).

    Returns:
        Distillation: The algorithm, for a ``Trainer``'s ``algorithms``.

    Raises:
        RecipeError: If ``Distillation`` refuses the section.

    Example:
        .. testcode::

            import torch
            from composer_kd.recipes import load_recipe
            from composer_kd.recipes.components import build_distillation

            recipe = load_recipe('digits', ['distillation.temperature=2'])
            distillation = build_distillation(recipe, [torch.nn.Linear(64, 10)])
            assert distillation.kd_loss_fn.temperature == 2.0
    """
    d = recipe.distillation
    schedules = {name: _schedule(spec) for name, spec in d.schedules.items()}
    try:
        return Distillation(
            teachers=list(teachers),
            kd_loss_fn=loss_from_name(d.loss, d.temperature, **d.loss_options),
            org_loss_weight=schedules.get('org_loss_weight', d.org_loss_weight),
            kd_loss_weight=schedules.get('kd_loss_weight', d.kd_loss_weight),
            n_teachers_to_sample=d.n_teachers_to_sample,
            start=time_or_fraction(d.start),
            end=time_or_fraction(d.end),
            temperature=schedules.get('temperature'),
            feature_pairs=[FeaturePair(**pair) for pair in d.feature_pairs],
            on_policy=None if d.on_policy is None else OnPolicy(**d.on_policy),
        )
    except (TypeError, ValueError) as e:
        raise RecipeError('recipe', [f'distillation: {e}']) from e


def build_compression(recipe: Recipe, task: TaskInfo, student: ComposerModel) -> list[Any]:
    """The algorithms of the recipe's ``compression`` section, for one student's trainer (fresh ones each call).

    Quantization-aware training comes first, so that pruning (if both are asked for) acts on the
    quantization-aware layers, and both come before ``Distillation``.

    Args:
        recipe (Recipe): The recipe.
        task (TaskInfo): The dataset's input shape (for the example input that tracing asks for).
        student (ComposerModel): The student the algorithms will compress; its layer paths are checked here.

    Returns:
        list: ``QuantizationAwareTraining`` and/or ``Pruning``, possibly none.

    Raises:
        RecipeError: If ``compression.pruning.modules`` names no prunable layer of the student.
    """
    spec, algorithms = recipe.compression, []
    if spec.qat is not None:
        algorithms.append(
            QuantizationAwareTraining(
                example_inputs=torch.zeros(1, *task.input_shape),
                backend=spec.qat.backend,
                freeze_observers=time_or_fraction(spec.qat.freeze_observers),
                freeze_bn_stats=time_or_fraction(spec.qat.freeze_bn_stats),
            )
        )
    if spec.pruning is not None:
        p = spec.pruning
        modules = None if p.modules is None else list(p.modules)
        try:
            prunable_modules(student, modules)
        except ValueError as e:
            # 'modules[2]: ...' becomes 'compression.pruning.modules.2: ...', the key as a recipe writes it.
            message = re.sub(r'^modules\[(\d+)\]', r'modules.\1', str(e))
            raise RecipeError('recipe', [f'compression.pruning.{message}']) from e
        algorithms.append(
            Pruning(
                amount=p.amount,
                structured=p.structured,
                modules=modules,
                start=time_or_fraction(p.start),
                end=time_or_fraction(p.end),
            )
        )
    return algorithms


def build_task_distillations(recipe: Recipe, teachers: Sequence[ComposerModel]) -> list[Distillation]:
    """One named ``Distillation`` per entry of ``distillation.tasks`` (the multi-task form), over ``teachers``.

    Each task takes its own teachers, loss, temperature and weight (the ``distillation`` section's where it
    sets none); the section's ``org_loss_weight`` (or its schedule) weights the student's own loss once, and its
    ``start`` / ``end`` window applies to every task.

    Args:
        recipe (Recipe): The recipe.
        teachers (Sequence[ComposerModel]): The teachers, built (and trained or loaded).

    Returns:
        list[Distillation]: The algorithms, in the order of ``distillation.tasks``.

    Raises:
        RecipeError: If ``Distillation`` refuses a task.
    """
    d = recipe.distillation
    schedules = {name: _schedule(spec) for name, spec in d.schedules.items()}
    window = {'start': time_or_fraction(d.start), 'end': time_or_fraction(d.end)}
    tasks = [
        DistillationTask(
            name=task.name,
            teachers=[teachers[i] for i in task_teachers(recipe, task)],
            kd_loss_weight=task.kd_loss_weight if task.kd_loss_weight is not None else d.kd_loss_weight,
            kd_loss_fn=loss_from_name(
                task.loss or d.loss,
                task.temperature if task.temperature is not None else d.temperature,
                **({} if task.loss else d.loss_options),
            ),
            student_logits_key=task.student_logits_key,
            teacher_logits_key=task.teacher_logits_key,
            options=window,
        )
        for task in d.tasks
    ]
    try:
        return task_distillations(tasks, org_loss_weight=schedules.get('org_loss_weight', d.org_loss_weight))
    except (TypeError, ValueError) as e:
        raise RecipeError('recipe', [f'distillation: {e}']) from e
