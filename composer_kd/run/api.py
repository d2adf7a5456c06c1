"""``distill()``: knowledge distillation in one call, reported like ``composer-kd train`` reports a recipe.

It takes the models and data a Composer user already has, builds an ordinary ``Trainer`` with
:class:`~composer_kd.Distillation` in its algorithms, and runs it through
:func:`~composer_kd.run.reporting.fit_and_report`, the same core that runs every recipe: so its report is a
:class:`~composer_kd.run.reporting.RunSummary` with the teachers', the distilled student's and (with
``baseline=True``) the student alone's metrics, parameters and training time, the distillation ratio, the
inference speed-up and the wall time.

A call runs in stages: its arguments are checked and its teachers resolved; its data are made into loaders and
checked on their first batches; the student, the teachers' evaluated forms and the ``Distillation`` are built;
and only then, the teachers frozen, are the settings searched, the student trained and every model reported.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple, Optional, Union

import torch
from composer import Trainer
from composer.core import Algorithm, Callback, Precision, Time
from composer.devices import Device
from composer.loggers import LoggerDestination
from composer.models import ComposerModel
from composer.utils import reproducibility
from torch import nn

from composer_kd.distillation import Distillation, KDLossFn
from composer_kd.losses import LOSSES, canonical_loss_name, loss_from_name
from composer_kd.models.rng import preserved_rng
from composer_kd.models.teachers import FrozenTeachers, TeacherSpec, refuse_shared_parameters, resolve_teachers
from composer_kd.multitask import DistillationTask, task_distillations
from composer_kd.options import did_you_mean, given_options, refuse_conflicts, refuse_unknown_keywords
from composer_kd.run.adapters import (
    as_loader,
    check_batch,
    composer_student,
    describe_module,
    eval_loaders,
    evaluable_teacher,
    first_batch,
    is_hf_pretrained,
    is_hugging_face,
    prepare_dataset,
)
from composer_kd.run.reporting import RunSummary, TeacherEntry, evaluate_model, fit_and_report
from composer_kd.run.search import Candidate, SearchReport, SearchSpec, check_split, run_search, search_spec
from composer_kd.run.training import DEVICES, PRECISIONS, build_optimizer, check_optimizer, make_trainer
from composer_kd.schedules import ScheduleOrValue

__all__ = ['DistillResult', 'distill']

# Distillation's arguments that distill() sets from its own: they cannot come through **options.
_SET_BY_DISTILL = {
    'teachers': 'pass the teacher(s) as the first argument',
    'kd_loss_fn': 'pass the loss as kd_loss= (a name such as "kl", or a callable)',
}
# Distillation's arguments that each task sets for itself under tasks=.
_PER_TASK = ('name', 'student_logits_key', 'teacher_logits_key')

# Trainer arguments distill() sets itself, and the distill() argument that sets each.
_OWN_TRAINER_ARGUMENTS = {
    'model': 'the student',
    'train_dataloader': 'train_data',
    'eval_dataloader': 'eval_data',
    'eval_interval': 'eval_interval=',
    'max_duration': 'max_duration=',
    'optimizers': 'optimizer=',
    'algorithms': 'algorithms=',
    'callbacks': 'callbacks=',
    'loggers': 'loggers=',
    'precision': 'precision=',
    'device': 'device=',
    'seed': 'seed=',
    'save_folder': 'save_folder=',
    'progress_bar': 'progress_bar=',
    'log_to_console': 'loggers=',
}

#: A teacher of a run as it is reported: the module that teaches, the form a ``Trainer`` evaluates (``None``
#: when it cannot be evaluated) and its description.
_TeacherForms = tuple[nn.Module, Optional[nn.Module], str]


class DistillResult(NamedTuple):
    """What :func:`distill` returns; unpack it as ``student, report = distill(...)``.

    Args:
        student: The student that was passed in, trained in place.
        report (RunSummary): Every model's metrics, parameters and training time, the distillation ratio
            (``report.ratio``), the inference speed-up (``report.speedup``) and the wall time; print it with
            :func:`~composer_kd.run.reporting.format_summary`.

    Example:
        .. testcode::

            from composer_kd import DistillResult
            from composer_kd.run.reporting import RunSummary

            result = DistillResult(student='the student', report=RunSummary('distill()', [], 'test', 'accuracy'))
            student, report = result
            assert student == 'the student' and report.ratio is None
    """

    student: Any
    report: RunSummary


@dataclass
class _Training:
    """How every student of a :func:`distill` call is trained: the budget, the optimizer and the ``Trainer``
    settings that the distilled student, the student alone and each search candidate share.

    Args:
        max_duration (str | int | Time): The training budget.
        optimizer (str | type | Optimizer): As :func:`distill` takes it.
        lr (float): The learning rate of an optimizer built here.
        weight_decay (float): Its weight decay.
        seed (int): Every trainer's seed.
        device (str | Device, optional): Composer device.
        precision (str | Precision, optional): Composer precision.
        progress_bar (bool): Composer's progress bar.
        trainer_kwargs (Mapping[str, Any]): Any other ``Trainer`` argument.
    """

    max_duration: Union[str, int, Time]
    optimizer: Union[str, type, torch.optim.Optimizer]
    lr: float
    weight_decay: float
    seed: int
    device: Optional[Union[str, Device]]
    precision: Optional[Union[str, Precision]]
    progress_bar: bool
    trainer_kwargs: Mapping[str, Any]

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh optimizer over ``model``'s parameters, of the kind and settings given."""
        return build_optimizer(self.optimizer, model, lr=self.lr, weight_decay=self.weight_decay)

    def trainer_arguments(self) -> dict[str, Any]:
        """The arguments of :func:`~composer_kd.run.training.make_trainer` every student's trainer is given."""
        return dict(
            max_duration=self.max_duration,
            seed=self.seed,
            precision=self.precision,
            device=self.device,
            progress_bar=self.progress_bar,
            **self.trainer_kwargs,
        )


@dataclass
class _Plan:
    """A :func:`distill` call's arguments, checked: what distils, how each student trains, and what is reported.

    Args:
        training (_Training): How every student trains.
        kd_loss (str | Callable): The loss as given (each task's default with ``tasks=``).
        kd_loss_fn (Callable): The loss object it names, at the temperature given when that is a constant.
        temperature (float | Schedule, optional): The temperature given.
        org_loss_weight (float | Schedule): Weight of the student's own loss.
        kd_loss_weight (float | Schedule): Weight of the distillation loss.
        options (Mapping[str, Any]): ``Distillation``'s other arguments.
        algorithms (list[Algorithm]): The other Composer algorithms.
        callbacks (list[Callback]): The distilled student's callbacks.
        loggers (list[LoggerDestination]): The distilled student's logger destinations.
        baseline (bool): Whether the student alone is trained too.
        measure_speed (bool): Whether inference is timed.
        save_folder (str, optional): Where the distilled student's checkpoints go.
        eval_interval (str | int, optional): How often the distilled student is evaluated during training.
        search (SearchSpec, optional): The settings search, when one was asked for.
        teachers (list[nn.Module]): Every teacher, checkpoints loaded (a multi-task run's in task order); set by
            :func:`_resolve_models`.
        tasks (list[DistillationTask], optional): With ``tasks=``, copies of the tasks with their teachers resolved.
    """

    training: _Training
    kd_loss: Union[str, KDLossFn]
    kd_loss_fn: KDLossFn
    temperature: Optional[ScheduleOrValue]
    org_loss_weight: ScheduleOrValue
    kd_loss_weight: ScheduleOrValue
    options: Mapping[str, Any]
    algorithms: list[Algorithm]
    callbacks: list[Callback]
    loggers: list[LoggerDestination]
    baseline: bool
    measure_speed: bool
    save_folder: Optional[str]
    eval_interval: Optional[Union[str, int]]
    search: Optional[SearchSpec] = None
    teachers: list[nn.Module] = dataclasses.field(default_factory=list)
    tasks: Optional[list[DistillationTask]] = None

    def distillation(self, candidate: Optional[Candidate] = None) -> Distillation:
        """The ``Distillation`` of a single-task run: with this call's settings, or with a search candidate's."""
        if candidate is None:
            kd_loss_fn, temperature = self.kd_loss_fn, self.temperature
            kd_loss_weight, org_loss_weight = self.kd_loss_weight, self.org_loss_weight
        else:
            kd_loss_fn, temperature = candidate.loss(), candidate.temperature
            kd_loss_weight, org_loss_weight = candidate.kd_loss_weight, candidate.org_loss_weight
        return Distillation(
            teachers=self.teachers,
            kd_loss_fn=kd_loss_fn,
            org_loss_weight=org_loss_weight,
            kd_loss_weight=kd_loss_weight,
            temperature=temperature,
            **self.options,
        )


class _Data(NamedTuple):
    """A run's data as its trainers take them.

    Args:
        train_loader (DataLoader | DataSpec): The training data.
        splits (dict[str, DataLoader | DataSpec]): The evaluation data by split; the first is the headline's.
        sample (Any): The first training batch, which the models are probed on.
    """

    train_loader: Any
    splits: dict[str, Any]
    sample: Any


class _Built(NamedTuple):
    """What a run trains and reports.

    Args:
        student (ComposerModel): The student as a ``ComposerModel`` (itself, or a wrapper holding it).
        teachers (list[_TeacherForms]): Each teacher as it is reported.
        distillations (list[Distillation]): The ``Distillation`` (one per task with ``tasks=``); empty with a
            search, whose chosen candidate's is built once it is known.
    """

    student: ComposerModel
    teachers: list[_TeacherForms]
    distillations: list[Distillation]


def _check_choice(name: str, value: Any, known: Sequence[str], extra: tuple[type, ...] = ()) -> None:
    if value is None or isinstance(value, extra) or (isinstance(value, str) and value in known):
        return
    raise ValueError(
        f'{name}: unknown value {value!r}{did_you_mean(value, known)} (known: {", ".join(known)}, or None).'
    )


def _check_options(options: Mapping[str, Any]) -> None:
    """Refuse keywords that are neither :func:`distill`'s nor ``Distillation``'s, naming the nearest known one."""
    allowed = set(inspect.signature(Distillation.__init__).parameters) - {'self'}
    own = set(inspect.signature(distill).parameters) - {'options'}
    for key in options:
        if key in _SET_BY_DISTILL:
            raise TypeError(f'distill() sets {key!r} itself: {_SET_BY_DISTILL[key]}.')
    try:
        refuse_unknown_keywords('distill', options, sorted(allowed | own))
    except TypeError as e:
        taken = ', '.join(sorted(allowed - set(_SET_BY_DISTILL)))
        raise TypeError(f'{e} (besides its own options it takes those of Distillation: {taken}).') from None


def _check_trainer_kwargs(trainer_kwargs: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    trainer_kwargs = dict(trainer_kwargs or {})
    accepted = set(inspect.signature(Trainer.__init__).parameters) - {'self'}
    for key in trainer_kwargs:
        if key not in accepted:
            raise TypeError(f'trainer_kwargs: Trainer has no argument {key!r}' + (did_you_mean(key, accepted) or '.'))
        if key in _OWN_TRAINER_ARGUMENTS:
            raise TypeError(f'trainer_kwargs: {key!r} is set by distill(); pass it as {_OWN_TRAINER_ARGUMENTS[key]}.')
    return trainer_kwargs


def _check_settings(
    integers: Mapping[str, tuple[Any, int]],
    flags: Mapping[str, Any],
    num_classes: Any,
    max_duration: Any,
) -> None:
    """Refuse integers below their minimum, flags that are not booleans, and a malformed duration, by name."""
    for name, (value, minimum) in integers.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
    if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}.')
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f'{name} must be True or False, got {flag!r}.')
    try:
        Time.from_input(max_duration)
    except (TypeError, ValueError) as e:
        raise ValueError(f"max_duration: {e} (expected e.g. '10ep', '500ba' or an integer number of epochs)") from e


def _check_sequence(name: str, values: Sequence[Any], kind: type) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        values = [values]
    for i, value in enumerate(values):
        if not isinstance(value, kind):
            raise TypeError(f'{name}[{i}] must be a Composer {kind.__name__}, got {type(value).__name__}.')
    return list(values)


def _check_algorithms(algorithms: Sequence[Algorithm]) -> list[Algorithm]:
    algorithms = _check_sequence('algorithms', algorithms, Algorithm)
    if any(isinstance(a, Distillation) for a in algorithms):
        raise ValueError('algorithms: distill() adds its own Distillation; use tasks= for several.')
    return algorithms


def _kd_loss_fn(kd_loss: Union[str, KDLossFn], temperature: Optional[ScheduleOrValue]) -> KDLossFn:
    if callable(kd_loss):
        return kd_loss
    if not isinstance(kd_loss, str):
        raise TypeError(f'kd_loss must be a loss name or a callable, got {type(kd_loss).__name__}.')
    if canonical_loss_name(kd_loss) is None:
        hint = did_you_mean(kd_loss, LOSSES)
        raise ValueError(f'kd_loss: unknown loss {kd_loss!r}{hint} (known: {", ".join(LOSSES)}).')
    # A scheduled temperature is Distillation's to apply at each step; the loss then keeps its own.
    constant = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    return loss_from_name(kd_loss, temperature if constant else None)


def _resolve(teachers: TeacherSpec, name: str) -> list[nn.Module]:
    try:
        return resolve_teachers(teachers)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise type(e)(f'{name}: {e}') from e


def _resolve_tasks(tasks: Any, options: Mapping[str, Any]) -> list[DistillationTask]:
    """Copies of the tasks, as ``DistillationTask`` s with their teachers resolved (checkpoints loaded)."""
    per_task = [key for key in _PER_TASK if key in options]
    if per_task:
        raise TypeError(f'{per_task[0]}: with tasks=, each task sets its own (a DistillationTask field).')
    if isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, Sequence) or not tasks:
        raise TypeError('tasks must be a non-empty list of DistillationTask or dicts of its fields.')
    resolved = []
    for i, task in enumerate(tasks):
        try:
            task = DistillationTask(**task) if isinstance(task, Mapping) else task
        except TypeError as e:
            raise TypeError(f'tasks[{i}]: {e}') from e
        if not isinstance(task, DistillationTask):
            raise TypeError(f'tasks[{i}] must be a DistillationTask or a dict, got {type(task).__name__}.')
        resolved.append(copy.copy(task))
        resolved[-1].teachers = _resolve(task.teachers, f'tasks[{i}].teachers')
    return resolved


def _prepare_tasks(
    task_list: list[DistillationTask],
    sample: Any,
    options: Mapping[str, Any],
    kd_loss: Union[str, KDLossFn],
    temperature: Optional[ScheduleOrValue],
) -> list[_TeacherForms]:
    """Complete each task with distill()'s defaults; ``(teacher, evaluable form, description)`` per teacher."""
    entries = []
    for i, task in enumerate(task_list):
        task.options = {**options, **task.options}
        plain = [not isinstance(m, ComposerModel) and not is_hf_pretrained(m) for m in task.teachers]
        if all(plain) and isinstance(sample, Mapping) and 'inputs' in sample:
            # Plain modules read the inputs of a multi-task batch {'inputs': x, task: labels, ...}.
            task.options.setdefault('input_key', 'inputs')
        for j, module in enumerate(task.teachers):
            name = f'tasks[{i}].teachers[{j}]'
            key = task.options.get('input_key')
            wrapped = evaluable_teacher(module, name, sample, None, task.name, key, index=j)
            entries.append((module, wrapped, f'{describe_module(module)} for task {task.name}'))
        if task.kd_loss_fn is None:  # distill()'s loss, at the task's temperature or distill()'s
            task.temperature = task.temperature if task.temperature is not None else temperature
            task.kd_loss_fn = (
                _kd_loss_fn(kd_loss, task.temperature) if isinstance(kd_loss, str) else copy.deepcopy(kd_loss)
            )
    return entries


class _Placement:
    """The devices of some modules' parameters, to put them back where they were."""

    def __init__(self, modules: Sequence[nn.Module]):
        self._devices = [(m, {p.device for p in m.parameters()}) for m in modules]

    def restore(self) -> None:
        for module, devices in self._devices:
            if len(devices) == 1:
                module.to(next(iter(devices)))


def distill(
    teacher: Optional[TeacherSpec],
    student: Any,
    train_data: Any,
    eval_data: Any = None,
    *,
    num_classes: Optional[int] = None,
    tasks: Optional[Sequence[Union[DistillationTask, Mapping[str, Any]]]] = None,
    kd_loss: Union[str, KDLossFn] = 'kl',
    temperature: Optional[ScheduleOrValue] = None,
    org_loss_weight: ScheduleOrValue = 1.0,
    kd_loss_weight: ScheduleOrValue = 1.0,
    max_duration: Union[str, int, Time] = '1ep',
    optimizer: Union[str, type, torch.optim.Optimizer] = 'Adam',
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    eval_batch_size: int = 256,
    seed: int = 17,
    device: Optional[Union[str, Device]] = None,
    precision: Optional[Union[str, Precision]] = None,
    baseline: bool = False,
    algorithms: Sequence[Algorithm] = (),
    callbacks: Sequence[Callback] = (),
    loggers: Sequence[LoggerDestination] = (),
    save_folder: Optional[str] = None,
    eval_interval: Optional[Union[str, int]] = None,
    progress_bar: bool = False,
    measure_speed: bool = True,
    search: Optional[Mapping[str, Any]] = None,
    trainer_kwargs: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` on ``train_data`` with a Composer ``Trainer``, and report.

    The student is trained in place by an ordinary ``Trainer`` holding ``Distillation``; the teachers' weights,
    modes, ``requires_grad`` flags and devices are as they were when this returns. With ``baseline=True`` a copy of
    the student as given is also trained alone on the same batches, budget, optimizer settings, algorithms and
    seed, for the distillation ratio. Every argument is checked, and every problem named, before any weight changes.

    A ``ComposerModel`` is used as it is; a Hugging Face ``PreTrainedModel`` is wrapped in ``HuggingFaceModel``; a
    plain ``nn.Module`` classifier in a ``ComposerClassifier`` (classes read from its output or ``num_classes``).
    Data may be a map-style dataset (batched with Composer's seeded sampler), a ``DataLoader`` or a ``DataSpec``; a
    ``datasets.Dataset`` must give tensors, and its ``label`` column is read as ``labels``.

    Args:
        teacher: The teacher(s), in any form ``Distillation`` takes: a model, a list of models (their logits
            averaged), or ``{checkpoint_path: model}``. ``None`` with ``tasks``.
        student: The model to train.
        train_data: Training data.
        eval_data (optional): Evaluation data, or ``{split: data}``; the first split is the report's headline.
            Default: none (the report then has parameters and times but no metrics).
        num_classes (int, optional): Classes of a plain ``nn.Module`` student. Default: read from its output.
        tasks (Sequence[DistillationTask | dict], optional): One named ``Distillation`` per task (see
            :func:`~composer_kd.multitask.task_distillations`); ``kd_loss``, ``temperature`` and the other options
            are each task's defaults. Default: none.
        kd_loss (str | Callable, optional): A loss name of ``composer_kd.LOSSES`` (``'kl'``, ``'js'``, ...) or a
            callable ``(student_logits, teacher_logits) -> scalar``. Default: ``'kl'``.
        temperature (float | Schedule, optional): The softening temperature. Default: ``None``, the loss's own
            (4.0 for the named losses that take one).
        org_loss_weight (float | Schedule, optional): Weight of the student's own loss. Default: ``1.0``.
        kd_loss_weight (float | Schedule, optional): Weight of the distillation loss. Default: ``1.0``.
        max_duration (str | int | Time, optional): Training budget (``'10ep'``, ``'500ba'``). Default: ``'1ep'``.
        optimizer (str | type | Optimizer, optional): A class name of ``composer.optim`` or ``torch.optim``, an
            optimizer class (built with ``lr`` and ``weight_decay``), or an optimizer over the student's
            parameters. Default: ``'Adam'``.
        lr (float, optional): Learning rate. Default: ``1e-3``.
        weight_decay (float, optional): Weight decay. Default: ``0.0``.
        batch_size (int, optional): Training batch size, for a dataset. Default: ``32``.
        eval_batch_size (int, optional): Evaluation batch size, for a dataset. Default: ``256``.
        seed (int, optional): Seed of initialization-free randomness: batch order, dropout. Default: ``17``.
        device (str | Device, optional): Composer device. Default: the accelerator if there is one.
        precision (str | Precision, optional): Composer precision, e.g. ``'amp_bf16'``. Default: the device's.
        baseline (bool, optional): Also train the student alone, for the distillation ratio. Default: ``False``.
        algorithms (Sequence[Algorithm], optional): Other Composer algorithms (copies go to the student alone).
        callbacks (Sequence[Callback], optional): Callbacks of the distilled student's trainer.
        loggers (Sequence[LoggerDestination], optional): Logger destinations of the distilled student's trainer.
        save_folder (str, optional): Where the distilled student's checkpoints go. Default: none saved.
        eval_interval (str | int, optional): Also evaluate during training, this often. Default: at the end only.
        progress_bar (bool, optional): Composer's progress bar. Default: ``False``.
        measure_speed (bool, optional): Time teacher 0's and the student's inference on 64 evaluation examples.
            Default: ``True``.
        search (Mapping, optional): Choose the settings on a validation split first: lists of ``kd_loss``,
            ``temperature``, ``kd_loss_weight`` and ``org_loss_weight`` whose product is tried from the same initial
            student, scored on ``split`` (never ``'test'``) by ``metric``; the best is trained with the full budget
            and reported on the other splits (see :mod:`composer_kd.run.search`). Default: none.
        trainer_kwargs (Mapping, optional): Any other ``Trainer`` argument (``schedulers``, ``save_interval``, ...).
        **options: Any other ``Distillation`` argument (``n_teachers_to_sample``, ``start``, ``end``,
            ``input_key``, ``student_logits_key``, ``feature_pairs``, ``teacher_inference``, ``name``, ...).

    Returns:
        DistillResult: ``(student, report)``: the student passed in, trained, and the run's ``RunSummary``.

    Raises:
        TypeError, ValueError: For an argument of the wrong kind or value, or models and data that do not fit
            together; the message names the argument.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import TensorDataset
            from composer_kd import distill

            x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
            teacher = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
            student, report = distill(
                teacher, torch.nn.Linear(8, 3), TensorDataset(x, y), TensorDataset(x, y), device='cpu', temperature=2.0
            )
            assert [m.role for m in report.models] == ['teacher 0', 'student (distilled)']
    """
    arguments = dict(locals())  # every parameter by name, as _check_arguments reads them
    started = time.perf_counter()
    with preserved_rng():  # checking and building leave every random generator as the caller's seed left it
        plan = _check_arguments(arguments)
        plan.teachers, plan.tasks = _resolve_models(teacher, student, tasks, options)
        data = _prepare_data(student, train_data, eval_data, batch_size, eval_batch_size, seed, plan.search)
        built = _build(plan, data, student, num_classes)
    report = _train_and_report(plan, data, built, describe_module(student), started)
    return DistillResult(student, report)


def _check_arguments(arguments: Mapping[str, Any]) -> _Plan:
    """Check every argument of :func:`distill` that needs neither the models nor the data, in the order a user
    reads them; the plan of the run, its teachers not yet resolved.

    Args:
        arguments (Mapping[str, Any]): :func:`distill`'s parameters by name.

    Raises:
        TypeError, ValueError: Naming the argument, as :func:`distill` documents.
    """
    given = SimpleNamespace(**arguments)
    _check_options(given.options)
    training = _Training(
        given.max_duration,
        given.optimizer,
        given.lr,
        given.weight_decay,
        given.seed,
        given.device,
        given.precision,
        given.progress_bar,
        _check_trainer_kwargs(given.trainer_kwargs or {}),
    )
    _check_settings(
        integers={
            'seed': (given.seed, 0),
            'batch_size': (given.batch_size, 1),
            'eval_batch_size': (given.eval_batch_size, 1),
        },
        flags={'baseline': given.baseline, 'measure_speed': given.measure_speed, 'progress_bar': given.progress_bar},
        num_classes=given.num_classes,
        max_duration=given.max_duration,
    )
    _check_choice('device', given.device, DEVICES, (Device,))
    _check_choice('precision', given.precision, PRECISIONS, (Precision,))
    plan = _Plan(
        training=training,
        algorithms=_check_algorithms(given.algorithms),
        callbacks=_check_sequence('callbacks', given.callbacks, Callback),
        loggers=_check_sequence('loggers', given.loggers, LoggerDestination),
        kd_loss=given.kd_loss,
        kd_loss_fn=_kd_loss_fn(given.kd_loss, given.temperature),
        temperature=given.temperature,
        org_loss_weight=given.org_loss_weight,
        kd_loss_weight=given.kd_loss_weight,
        options=given.options,
        baseline=given.baseline,
        measure_speed=given.measure_speed,
        save_folder=given.save_folder,
        eval_interval=given.eval_interval,
    )
    if given.search is not None:
        plan.search = _check_search(given.search, plan, tasks_given=given.tasks is not None)
    return plan


def _check_search(search: Mapping[str, Any], plan: _Plan, tasks_given: bool) -> SearchSpec:
    """The checked search, the settings it leaves out being this call's."""
    refuse_conflicts(given_options(search=True, tasks=tasks_given, teacher_cache=plan.options.get('teacher_cache')))
    spec = search_spec(
        search,
        kd_loss=plan.kd_loss,
        temperature=plan.temperature,
        kd_loss_weight=plan.kd_loss_weight,
        org_loss_weight=plan.org_loss_weight,
        max_duration=plan.training.max_duration,
    )
    _check_settings(integers={}, flags={}, num_classes=None, max_duration=spec.max_duration)
    return spec


def _resolve_models(
    teacher: Optional[TeacherSpec], student: Any, tasks: Optional[Sequence[Any]], options: Mapping[str, Any]
) -> tuple[list[nn.Module], Optional[list[DistillationTask]]]:
    """Every teacher, checkpoints loaded (a multi-task run's in task order), and the tasks holding them.

    Raises:
        TypeError, ValueError: For a teacher missing or given beside ``tasks=``, a student that is no module, or a
            teacher sharing the student's parameters.
    """
    resolved_tasks = None
    if tasks is not None:
        if teacher is not None:
            raise ValueError('teacher: with tasks=, each task names its own teachers; pass teacher=None.')
        resolved_tasks = _resolve_tasks(tasks, options)
        teachers = [t for task in resolved_tasks for t in task.teachers]
    else:
        if teacher is None:
            raise TypeError('teacher is required (a model, a list of models, or {checkpoint: model}).')
        teachers = _resolve(teacher, 'teacher')
    if not isinstance(student, nn.Module):
        raise TypeError(
            'student must be an nn.Module, a ComposerModel or a Hugging Face PreTrainedModel, '
            f'got {type(student).__name__}.'
        )
    refuse_shared_parameters(teachers, student)
    return teachers, resolved_tasks


def _prepare_data(
    student: nn.Module,
    train_data: Any,
    eval_data: Any,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    search: Optional[SearchSpec],
) -> _Data:
    """The training and evaluation loaders, each checked on its first batch.

    A Hugging Face student reads its labels from ``labels``: a ``datasets.Dataset``'s usual ``label`` column is
    renamed. With a search, the split the settings are chosen on goes last (see :func:`_splits_to_report`).
    """
    hugging_face = is_hugging_face(student)
    train_data = prepare_dataset(train_data, 'train_data', hugging_face)
    if isinstance(eval_data, Mapping):
        eval_data = {k: prepare_dataset(v, f'eval_data[{k!r}]', hugging_face) for k, v in eval_data.items()}
    else:
        eval_data = prepare_dataset(eval_data, 'eval_data', hugging_face)
    train_loader = as_loader(train_data, 'train_data', batch_size, shuffle=True, seed=seed)
    splits = eval_loaders(eval_data, eval_batch_size, seed)
    if search is not None:
        check_split(search, list(splits))
        splits = _splits_to_report(splits, search.split)
    sample = first_batch(train_loader, 'train_data')
    check_batch(sample, 'train_data', hugging_face)
    for split, loader in splits.items():
        check_batch(first_batch(loader, f'eval_data[{split!r}]'), f'eval_data[{split!r}]', hugging_face)
    return _Data(train_loader, splits, sample)


def _splits_to_report(splits: Mapping[str, Any], chosen_on: str) -> dict[str, Any]:
    """``splits`` with ``chosen_on`` moved last: the report's headline is the first split, and must be one the
    settings were not chosen on."""
    return {**{k: v for k, v in splits.items() if k != chosen_on}, chosen_on: splits[chosen_on]}


def _build(plan: _Plan, data: _Data, student: nn.Module, num_classes: Optional[int]) -> _Built:
    """The student as a ``ComposerModel``, each teacher in the form it is evaluated in, and the ``Distillation``.

    Each is checked as it is built: the student and the plain teachers are run once on the first training batch,
    and with a search every candidate's ``Distillation`` is built once, before anything trains.
    """
    wrapped = composer_student(student, data.sample, num_classes, plan.tasks is not None)
    check_optimizer(plan.training.optimizer, wrapped, lr=plan.training.lr, weight_decay=plan.training.weight_decay)
    if plan.tasks is not None:
        teachers = _prepare_tasks(plan.tasks, data.sample, plan.options, plan.kd_loss, plan.temperature)
        return _Built(wrapped, teachers, task_distillations(plan.tasks, org_loss_weight=plan.org_loss_weight))
    student_classes = getattr(wrapped, 'num_classes', None)
    input_key = plan.options.get('input_key')
    teachers = [
        (
            module,
            evaluable_teacher(module, f'teacher {i}', data.sample, student_classes, None, input_key, index=i),
            describe_module(module),
        )
        for i, module in enumerate(plan.teachers)
    ]
    if plan.search is None:
        return _Built(wrapped, teachers, [plan.distillation()])
    for candidate in plan.search.candidates:
        plan.distillation(candidate)
    return _Built(wrapped, teachers, [])


def _train_and_report(plan: _Plan, data: _Data, built: _Built, student_description: str, started: float) -> RunSummary:
    """Search the settings if asked, train the distilled student (and the student alone), and report.

    The teachers are frozen throughout; their modes, ``requires_grad`` flags and devices are given back at the end,
    whatever happens.
    """
    frozen, placement = FrozenTeachers(plan.teachers), _Placement(plan.teachers)
    frozen.freeze()
    try:
        # The student as given, before any training: every search candidate and the student alone start from it.
        initial = copy.deepcopy(built.student) if plan.baseline or plan.search is not None else None
        alone_algorithms = copy.deepcopy(plan.algorithms) if plan.baseline else []
        distillations, search_report = built.distillations, None
        if plan.search is not None:
            assert initial is not None
            search_report = _search(plan, data, initial)
            distillations = [plan.distillation(search_report.best)]
        trainer = _distilled_trainer(plan, data, built.student, distillations)

        def student_alone() -> tuple[ComposerModel, Trainer]:
            assert initial is not None
            arguments = plan.training.trainer_arguments()
            optimizer = plan.training.new_optimizer(initial)
            return initial, make_trainer(
                initial, data.train_loader, optimizer=optimizer, algorithms=alone_algorithms, **arguments
            )

        report = fit_and_report(
            'distill()',
            built.student,
            trainer,
            lambda model: _evaluate(plan.training, data.splits, model),
            seed=plan.training.seed,
            teachers=[
                TeacherEntry(model=wrapped or module, description=description, evaluated=wrapped is not None)
                for module, wrapped, description in built.teachers
            ],
            student_description=student_description,
            student_alone=student_alone if plan.baseline else None,
            speed_batch=_speed_batch(plan.measure_speed, data, built.teachers),
            started=started,
        )
        report.search = search_report
    finally:
        frozen.restore()
        placement.restore()
    return report


def _distilled_trainer(
    plan: _Plan, data: _Data, student: ComposerModel, distillations: Sequence[Distillation]
) -> Trainer:
    """The distilled student's trainer, with the callbacks, loggers, checkpoints and evaluation given."""
    training = plan.training
    # The optimizer given is the distilled student's own; the student alone gets a fresh one like it.
    optimizer = training.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = training.new_optimizer(student)
    return make_trainer(
        student,
        data.train_loader,
        optimizer=optimizer,
        algorithms=[*plan.algorithms, *distillations],
        callbacks=plan.callbacks,
        loggers=plan.loggers,
        save_folder=plan.save_folder,
        eval_dataloaders=data.splits if plan.eval_interval is not None else None,
        eval_interval=plan.eval_interval if plan.eval_interval is not None else 1,
        **training.trainer_arguments(),
    )


def _evaluate(training: _Training, splits: Mapping[str, Any], model: nn.Module) -> dict[str, dict[str, float]]:
    return evaluate_model(model, splits, device=training.device, precision=training.precision, seed=training.seed)


def _speed_batch(measure_speed: bool, data: _Data, teachers: Sequence[_TeacherForms]) -> Any:
    """The batch teacher 0's and the student's inference are timed on: the first evaluation split's first batch,
    or without evaluation data the first training batch; ``None`` when not timed.

    A teacher is timed in the form it is evaluated in, so one that cannot be evaluated is not timed.
    """
    if not measure_speed or teachers[0][1] is None:
        return None
    return first_batch(next(iter(data.splits.values())), 'eval_data') if data.splits else data.sample


def _search(plan: _Plan, data: _Data, initial: ComposerModel) -> SearchReport:
    """Train a copy of ``initial`` for each candidate (and alone, with ``baseline``) and score it on one split.

    The candidates' trainers get no evaluation data: the only evaluation is :func:`evaluate_model` on the
    selection split, after each fit.
    """
    spec = plan.search
    assert spec is not None
    training = dataclasses.replace(plan.training, max_duration=spec.max_duration)
    selection = {spec.split: data.splits[spec.split]}

    def fit_and_score(algorithms: list[Algorithm]) -> tuple[float, str]:
        model = copy.deepcopy(initial)
        trainer = make_trainer(
            model,
            data.train_loader,
            optimizer=training.new_optimizer(model),
            algorithms=algorithms,
            **training.trainer_arguments(),
        )
        reproducibility.seed_all(training.seed)
        trainer.fit()
        trainer.close()
        values = _evaluate(training, selection, model)[spec.split]
        metric = spec.metric or next(iter(values), None)
        if metric not in values:
            raise ValueError(f'search[metric]: the student has no metric {metric!r} (it has: {", ".join(values)}).')
        return values[metric], metric

    return run_search(
        spec,
        lambda candidate: fit_and_score([*copy.deepcopy(plan.algorithms), plan.distillation(candidate)]),
        reference=(lambda: fit_and_score(copy.deepcopy(plan.algorithms))) if plan.baseline else None,
    )
