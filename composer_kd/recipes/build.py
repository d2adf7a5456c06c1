"""Turning a checked recipe into Composer objects: models, data, ``Distillation`` and ordinary ``Trainer`` s.

Nothing is trained here. :func:`build_run` returns a :class:`~composer_kd.recipes.run.RecipeRun` holding the
teachers' trainers (for teachers the recipe trains first) and the student's trainer; every object is built,
and so every constructor's complaint is heard, before the first step of any fit.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

from composer import Trainer
from composer.core import Callback, Evaluator
from composer.loggers import LoggerDestination
from composer.models import ComposerModel
from composer.utils import reproducibility
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_kd.compression import Pruning, QuantizationAwareTraining, prunable_modules
from composer_kd.distillation import Distillation
from composer_kd.features import FeaturePair
from composer_kd.losses import LOSSES, get_loss
from composer_kd.multitask import DistillationTask, task_distillations
from composer_kd.recipes.datasets import DataBundle, build_data
from composer_kd.recipes.loader import RecipeError
from composer_kd.recipes.models import TaskInfo, build_model
from composer_kd.recipes.schema import ComponentSpec, DataSpec, OptimizerSpec, Recipe, ScheduleSpec
from composer_kd.recipes.validate import (
    check_recipe,
    composer_algorithm,
    composer_logger,
    composer_scheduler,
    optimizer_class,
    task_teachers,
)
from composer_kd.schedules import ConstantSchedule, CosineSchedule, LinearSchedule, Schedule

__all__ = [
    'LoggerFactory',
    'build_compression',
    'build_distillation',
    'build_task_distillations',
    'build_run',
    'build_student_alone',
    'build_trainer',
    'evaluate',
    'evaluate_model',
    'teacher_data_spec',
]

# Seeds of the teachers' initializations are offset from the student's, so a teacher and a student of one
# architecture do not start from the same weights.
_TEACHER_SEED_OFFSET = 1000


def _time_or_fraction(value: Optional[str]) -> Union[str, float, None]:
    """``'0.5'`` is the fraction 0.5 of training; anything else a Composer time string."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


def teacher_data_spec(data: DataSpec, overrides: dict[str, Any]) -> DataSpec:
    """The recipe's ``data`` section with a teacher's ``train.data`` overrides applied.

    Raises:
        ValueError: If an override has the wrong type (the message names the key).
    """
    if not overrides:
        return data
    try:
        merged = OmegaConf.merge(OmegaConf.structured(data), overrides)
        spec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f'{getattr(e, "full_key", "")}: {str(e).splitlines()[0]}') from e
    assert isinstance(spec, DataSpec)
    return spec


def _construct(cls: type, kwargs: dict[str, Any], key: str, *args: Any) -> Any:
    """``cls(*args, **kwargs)``, with a constructor's complaint turned into a recipe error naming ``key``."""
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError, ImportError) as e:
        # build_run names the recipe; here only the key is known. ImportError: a logger's optional package.
        raise RecipeError('recipe', [f'{key}: {cls.__name__} refused {dict(kwargs)}: {e}']) from e


def _optimizer(spec: OptimizerSpec, model: ComposerModel, key: str):
    cls = optimizer_class(spec.name)
    kwargs = {'lr': spec.lr, 'weight_decay': spec.weight_decay, **dict(spec.kwargs)}
    return _construct(cls, kwargs, key, model.parameters())


def _component(spec: ComponentSpec, kind: str, key: str) -> Any:
    lookup = {'algorithm': composer_algorithm, 'logger': composer_logger, 'scheduler': composer_scheduler}[kind]
    return _construct(lookup(spec.name), dict(spec.kwargs), key)


def _schedule(spec: ScheduleSpec) -> Schedule:
    start, end = _time_or_fraction(spec.start), _time_or_fraction(spec.end)
    if spec.kind == 'constant':
        return ConstantSchedule(spec.start_value)
    cls = LinearSchedule if spec.kind == 'linear' else CosineSchedule
    return cls(spec.start_value, spec.end_value, start=start, end=end)


def _kd_loss(name: str, temperature: float):
    loss_name = {'mean_square_error': 'mse', 'cosine_distance': 'cosine', 'kl_divergence': 'kl'}.get(name, name)
    takes_temperature = 'temperature' in inspect.signature(LOSSES[loss_name]).parameters
    return get_loss(loss_name, **({'temperature': temperature} if takes_temperature else {}))


def build_distillation(recipe: Recipe, teachers: Sequence[ComposerModel]) -> Distillation:
    """The ``Distillation`` algorithm the recipe's ``distillation`` section describes, over ``teachers``.

    Args:
        recipe (Recipe): The recipe.
        teachers (Sequence[ComposerModel]): The teachers, built (and trained or loaded).

    Returns:
        Distillation: The algorithm, for a ``Trainer``'s ``algorithms``.
    """
    d = recipe.distillation
    kd_loss_fn = _kd_loss(d.loss, d.temperature)
    schedules = {name: _schedule(spec) for name, spec in d.schedules.items()}
    try:
        return Distillation(
            teachers=list(teachers),
            kd_loss_fn=kd_loss_fn,
            org_loss_weight=schedules.get('org_loss_weight', d.org_loss_weight),
            kd_loss_weight=schedules.get('kd_loss_weight', d.kd_loss_weight),
            n_teachers_to_sample=d.n_teachers_to_sample,
            start=_time_or_fraction(d.start),
            end=_time_or_fraction(d.end),
            temperature=schedules.get('temperature'),
            feature_pairs=[FeaturePair(**dataclasses.asdict(pair)) for pair in d.feature_pairs],
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
        import torch

        algorithms.append(
            QuantizationAwareTraining(
                example_inputs=torch.zeros(1, *task.input_shape),
                backend=spec.qat.backend,
                freeze_observers=_time_or_fraction(spec.qat.freeze_observers),
                freeze_bn_stats=_time_or_fraction(spec.qat.freeze_bn_stats),
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
                start=_time_or_fraction(p.start),
                end=_time_or_fraction(p.end),
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
    """
    d = recipe.distillation
    schedules = {name: _schedule(spec) for name, spec in d.schedules.items()}
    window = {'start': _time_or_fraction(d.start), 'end': _time_or_fraction(d.end)}
    tasks = [
        DistillationTask(
            name=task.name,
            teachers=[teachers[i] for i in task_teachers(recipe, task)],
            kd_loss_weight=task.kd_loss_weight if task.kd_loss_weight is not None else d.kd_loss_weight,
            kd_loss_fn=_kd_loss(
                task.loss or d.loss, task.temperature if task.temperature is not None else d.temperature
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


def _evaluators(data: DataBundle, splits: Sequence[str]) -> list[Evaluator]:
    return [Evaluator(label=split, dataloader=data.eval_loader(split)) for split in splits]


def eval_splits(recipe: Recipe, data: DataBundle) -> list[str]:
    """The splits a recipe evaluates: its ``data.eval_splits``, or the dataset's default."""
    return list(recipe.data.eval_splits or data.default_eval_splits)


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

    Returns:
        Trainer: Built, not yet fit.
    """
    splits = list(splits) if splits is not None else eval_splits(recipe, data)
    train_loader = data.train_loader()
    microbatch = recipe.device_train_microbatch_size
    if microbatch is None and train_loader.batch_size is None:
        microbatch = data.batch_size  # a batch sampler hides the batch size from Composer
    schedulers = [] if scheduler is None else [_component(scheduler, 'scheduler', f'{key}.scheduler')]
    return Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=_evaluators(data, splits) or None,
        eval_interval=recipe.eval_interval,
        max_duration=max_duration,
        optimizers=_optimizer(optimizer, model, f'{key}.optimizer'),
        schedulers=schedulers,
        algorithms=list(algorithms),
        loggers=list(loggers),
        callbacks=list(callbacks),
        progress_bar=recipe.progress_bar,
        log_to_console=False,
        precision=recipe.precision,
        device=recipe.device,
        device_train_microbatch_size=microbatch,
        seed=recipe.seed,
        save_folder=save_folder,
        save_interval=save_interval or recipe.save_interval,
        save_overwrite=True,
    )


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
    """
    if not dataloaders:
        return {}
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


def evaluate(
    recipe: Recipe, model: ComposerModel, data: DataBundle, splits: Sequence[str], device: Optional[str] = None
) -> dict[str, dict]:
    """Evaluate ``model`` on ``splits`` with a Composer ``Trainer``; ``{split: {metric: value}}``.

    ``device`` overrides the recipe's (an int8 model runs on the CPU only, in full precision).
    """
    loaders = {split: data.eval_loader(split) for split in splits}
    precision = None if device == 'cpu' else recipe.precision
    return evaluate_model(model, loaders, device=device or recipe.device, precision=precision, seed=recipe.seed)


def _student_tokenizer(recipe: Recipe) -> Optional[str]:
    return recipe.student.name if recipe.student.kind == 'huggingface' else None


#: Gives the extra logger destinations of one trainer of a run, by role: ``'teacher 0'``, ``'student (distilled)'``
#: (or ``'student alone'`` when the recipe disables distillation), and ``'student alone'`` for the baseline.
LoggerFactory = Callable[[str], Sequence[LoggerDestination]]


def _no_loggers(role: str) -> Sequence[LoggerDestination]:
    return ()


def build_run(
    recipe: Recipe,
    *,
    source: Optional[str] = None,
    loggers: Optional[LoggerFactory] = None,
    callbacks: Sequence[Callback] = (),
    teachers: Optional[Sequence[ComposerModel]] = None,
):
    """Check ``recipe`` and build everything it describes, training nothing yet.

    Args:
        recipe (Recipe): The recipe, from :func:`~composer_kd.recipes.loader.load_recipe`.
        source (str, optional): The recipe's name or path, for messages. Default: its ``name``.
        loggers (Callable[[str], Sequence[LoggerDestination]], optional): Extra logger destinations for each
            trainer, by role (e.g. an ``InMemoryLogger`` per model to draw curves). The recipe's own ``loggers``
            go to the student's trainer.
        callbacks (Sequence[Callback]): Extra callbacks for the student's trainer.
        teachers (Sequence[ComposerModel], optional): Teachers already built and trained (e.g. by an earlier run
            of this recipe) to use instead of the recipe's; none of them is trained again.

    Returns:
        RecipeRun: The teachers' and the student's trainers; call ``fit()`` to train.

    Raises:
        RecipeError: If the recipe has any problem (every one is listed), before anything is built.
    """
    problems = check_recipe(recipe)
    if problems:
        raise RecipeError(source or recipe.name, problems)
    try:
        return _build_run(recipe, loggers or _no_loggers, callbacks, teachers)
    except RecipeError as e:
        raise RecipeError(source or recipe.name, e.problems) from e


def _build_run(
    recipe: Recipe,
    loggers: LoggerFactory,
    callbacks: Sequence[Callback],
    given_teachers: Optional[Sequence[ComposerModel]],
):
    from composer_kd.recipes.run import RecipeRun

    data = build_data(recipe.data, recipe.seed, _student_tokenizer(recipe))
    teachers, teacher_trainers = [], []
    for i, spec in enumerate(recipe.teachers):
        if given_teachers is not None:
            teachers.append(given_teachers[i])
            teacher_trainers.append(None)
            continue
        reproducibility.seed_all(recipe.seed + _TEACHER_SEED_OFFSET * (i + 1))
        teacher = build_model(spec, data.task)
        teachers.append(teacher)
        if spec.train is None:
            teacher_trainers.append(None)
            continue
        teacher_data = data
        if spec.train.data:
            teacher_spec = teacher_data_spec(recipe.data, spec.train.data)
            teacher_data = build_data(teacher_spec, recipe.seed, _student_tokenizer(recipe))
            teacher_data.splits = data.splits  # evaluated on the student's splits, whatever it trained on
        teacher_trainers.append(
            build_trainer(
                recipe,
                teacher,
                teacher_data,
                max_duration=spec.train.max_duration,
                optimizer=spec.train.optimizer or recipe.optimizer,
                scheduler=spec.train.scheduler or recipe.scheduler,
                loggers=loggers(f'teacher {i}'),
                save_folder=os.path.join(recipe.save_folder, f'teacher-{i}') if recipe.save_folder else None,
                save_interval=spec.train.max_duration,
                key=f'teachers.{i}.train',
            )
        )

    if recipe.distillation.enabled:
        # Every student of a run starts from the same weights: the seed is set just before building it.
        reproducibility.seed_all(recipe.seed)
        student = build_model(recipe.student, data.task)
        algorithms = [_component(spec, 'algorithm', f'algorithms.{i}') for i, spec in enumerate(recipe.algorithms)]
        algorithms += build_compression(recipe, data.task, student)
        if recipe.distillation.tasks:
            algorithms.extend(build_task_distillations(recipe, teachers))
        else:
            algorithms.append(build_distillation(recipe, teachers))
        recipe_loggers = [_component(spec, 'logger', f'loggers.{i}') for i, spec in enumerate(recipe.loggers)]
        try:
            trainer = build_trainer(
                recipe,
                student,
                data,
                max_duration=recipe.max_duration,
                optimizer=recipe.optimizer,
                scheduler=recipe.scheduler,
                algorithms=algorithms,
                loggers=[*recipe_loggers, *loggers('student (distilled)')],
                callbacks=callbacks,
                save_folder=os.path.join(recipe.save_folder, 'student') if recipe.save_folder else None,
            )
        except ValueError as e:
            # Feature pairs' module paths are resolved when the trainer starts (Event.INIT).
            if not recipe.distillation.feature_pairs:
                raise
            raise RecipeError('recipe', [f'distillation.feature_pairs: {e}']) from e
    else:
        student, trainer = build_student_alone(recipe, data, loggers, callbacks, main=True)
    return RecipeRun(
        recipe=recipe,
        data=data,
        student=student,
        teachers=teachers,
        teacher_trainers=teacher_trainers,
        trainer=trainer,
        loggers=loggers,
    )


def build_student_alone(
    recipe: Recipe,
    data: DataBundle,
    loggers: LoggerFactory = _no_loggers,
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
    reproducibility.seed_all(recipe.seed)
    student = build_model(recipe.student, data.task)
    algorithms = [_component(spec, 'algorithm', f'algorithms.{i}') for i, spec in enumerate(recipe.algorithms)]
    algorithms += build_compression(recipe, data.task, student)
    recipe_loggers = (
        [_component(spec, 'logger', f'loggers.{i}') for i, spec in enumerate(recipe.loggers)] if main else []
    )
    trainer = build_trainer(
        recipe,
        student,
        data,
        max_duration=recipe.max_duration,
        optimizer=recipe.optimizer,
        scheduler=recipe.scheduler,
        algorithms=algorithms,
        loggers=[*recipe_loggers, *loggers('student alone')],
        callbacks=callbacks,
        save_folder=os.path.join(recipe.save_folder, 'student') if recipe.save_folder and main else None,
    )
    return student, trainer
