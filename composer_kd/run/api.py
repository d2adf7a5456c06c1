"""``distill()``: knowledge distillation in one call, reported like ``composer-kd train`` reports a recipe.

It takes the models and data a Composer user already has, builds an ordinary ``Trainer`` with
:class:`~composer_kd.Distillation` in its algorithms, and runs it through
:func:`~composer_kd.run.reporting.fit_and_report`, the same core that runs every recipe: so its report is a
:class:`~composer_kd.run.reporting.RunSummary` with the teachers', the distilled student's and (with
``baseline=True``) the student alone's metrics, parameters and training time, the distillation ratio, the
inference speed-up and the wall time.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import time
from collections.abc import Mapping, Sequence
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
from composer_kd.models.teachers import FrozenTeachers, TeacherSpec, resolve_teachers
from composer_kd.multitask import DistillationTask, task_distillations
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
from composer_kd.run.search import Candidate, SearchReport, check_split, run_search, search_spec
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


def _check_choice(name: str, value: Any, known: Sequence[str], extra: tuple[type, ...] = ()) -> None:
    if value is None or isinstance(value, extra) or (isinstance(value, str) and value in known):
        return
    close = difflib.get_close_matches(str(value), list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ''
    raise ValueError(f'{name}: unknown value {value!r}{hint} (known: {", ".join(known)}, or None).')


def _check_options(options: Mapping[str, Any]) -> None:
    """Refuse keywords that are neither :func:`distill`'s nor ``Distillation``'s, naming the nearest known one."""
    allowed = set(inspect.signature(Distillation.__init__).parameters) - {'self'}
    own = set(inspect.signature(distill).parameters) - {'options'}
    for key in options:
        if key in _SET_BY_DISTILL:
            raise TypeError(f'distill() sets {key!r} itself: {_SET_BY_DISTILL[key]}.')
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed | own), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            raise TypeError(
                f'distill() got an unexpected keyword argument {key!r}{hint} (besides its own options it takes '
                f'those of Distillation: {", ".join(sorted(allowed - set(_SET_BY_DISTILL)))}).'
            )


def _check_trainer_kwargs(trainer_kwargs: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    trainer_kwargs = dict(trainer_kwargs or {})
    accepted = set(inspect.signature(Trainer.__init__).parameters) - {'self'}
    for key in trainer_kwargs:
        if key not in accepted:
            raise TypeError(f'trainer_kwargs: Trainer has no argument {key!r}.')
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


def _kd_loss_fn(kd_loss: Union[str, KDLossFn], temperature: Optional[ScheduleOrValue]) -> KDLossFn:
    if callable(kd_loss):
        return kd_loss
    if not isinstance(kd_loss, str):
        raise TypeError(f'kd_loss must be a loss name or a callable, got {type(kd_loss).__name__}.')
    if canonical_loss_name(kd_loss) is None:
        close = difflib.get_close_matches(kd_loss, list(LOSSES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
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
) -> list[tuple[nn.Module, Optional[nn.Module], str]]:
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
            wrapped = evaluable_teacher(module, name, sample, None, task.name, task.options.get('input_key'))
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

    The student (and, where it is not one already, its wrapper) is trained in place by an ordinary ``Trainer``
    holding ``Distillation`` in its ``algorithms``; the teachers are never changed: their weights, modes,
    ``requires_grad`` flags and devices are as they were when this returns. With ``baseline=True`` a copy of
    the student as it was given is also trained alone, with the same batches, budget, optimizer settings, other
    algorithms and seed, and the report carries the distillation ratio. Every argument is checked, and every
    problem named, before any weight changes.

    Models may be given as Composer takes them: a ``ComposerModel`` is used as it is; a Hugging Face
    ``PreTrainedModel`` is wrapped in ``HuggingFaceModel`` (accuracy on its ``num_labels``); a plain
    ``nn.Module`` classifier (on ``(inputs, targets)`` batches) in a ``ComposerClassifier`` whose class count is
    read from its output (or checked against ``num_classes``). Data may be a map-style dataset (batched by
    ``batch_size`` / ``eval_batch_size`` with Composer's seeded sampler), a ``DataLoader`` or a ``DataSpec``. A
    Hugging Face ``datasets.Dataset`` must give tensors (``set_format('torch')``); its ``label`` column is read as
    the ``labels`` a Hugging Face student computes its loss from (the dataset passed in is unchanged).

    Args:
        teacher: The teacher(s), in any form ``Distillation`` takes: a model, a list of models (their logits
            averaged), or ``{checkpoint_path: model}``. ``None`` with ``tasks``.
        student: The model to train.
        train_data: Training data.
        eval_data (optional): Evaluation data, or ``{split: data}``; the first split is the report's headline.
            Default: none (the report then has parameters and times but no metrics).
        num_classes (int, optional): Classes of a plain ``nn.Module`` student. Default: read from its output.
        tasks (Sequence[DistillationTask | dict], optional): Multi-task distillation: one named
            ``Distillation`` per task (see :func:`~composer_kd.multitask.task_distillations`), each with its own
            teachers, weight and temperature; ``org_loss_weight`` weights the student's own loss once, and
            ``kd_loss``, ``temperature`` and the other options are each task's defaults. Default: none.
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
        eval_interval (str | int, optional): Also evaluate during training, this often (logged). Default:
            ``None``, only at the end, for the report.
        progress_bar (bool, optional): Composer's progress bar. Default: ``False``.
        measure_speed (bool, optional): Time teacher 0's and the student's inference on the first evaluation
            batch (its first 64 examples). Default: ``True``.
        search (Mapping, optional): Choose the distillation settings on a validation split first: lists of
            ``kd_loss`` (names, ``{'name': ..., **options}`` such as ``{'name': 'kl', 'standardize': True}``, or
            loss objects), ``temperature``, ``kd_loss_weight`` and ``org_loss_weight`` (a key left out keeps this
            call's value), whose product is tried, each candidate from the same initial student with the same
            batches and seed for ``max_duration`` (give a short budget; default: the full one), and scored on
            ``split`` (default ``'val'``, a key of ``eval_data``; never ``'test'``) by ``metric`` (default: the
            student's first). The best is then trained with the full budget and reported on the other splits
            (the headline is the first of them); ``report.search`` lists every candidate and its score (see
            :mod:`composer_kd.run.search`). Default: none, this call's settings are used as they are.
        trainer_kwargs (Mapping, optional): Any other ``Trainer`` argument (``schedulers``,
            ``device_train_microbatch_size``, ``save_interval``, ...).
        **options: Any other ``Distillation`` argument (``n_teachers_to_sample``, ``start``, ``end``,
            ``input_key``, ``student_logits_key``, ``feature_pairs``, ``teacher_inference``, ``name``, ...).

    Returns:
        DistillResult: ``(student, report)``: the student passed in, trained, and the run's
        :class:`~composer_kd.run.reporting.RunSummary`.

    Raises:
        TypeError: If an argument has the wrong kind (the message names it), or an option is unknown.
        ValueError: If a value is out of range or models and data do not fit together (named likewise).

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
    started = time.perf_counter()
    _check_options(options)
    trainer_kwargs = _check_trainer_kwargs(trainer_kwargs)
    _check_settings(
        integers={'seed': (seed, 0), 'batch_size': (batch_size, 1), 'eval_batch_size': (eval_batch_size, 1)},
        flags={'baseline': baseline, 'measure_speed': measure_speed, 'progress_bar': progress_bar},
        num_classes=num_classes,
        max_duration=max_duration,
    )
    _check_choice('device', device, DEVICES, (Device,))
    _check_choice('precision', precision, PRECISIONS, (Precision,))
    algorithms = _check_sequence('algorithms', algorithms, Algorithm)
    callbacks = _check_sequence('callbacks', callbacks, Callback)
    loggers = _check_sequence('loggers', loggers, LoggerDestination)
    if any(isinstance(a, Distillation) for a in algorithms):
        raise ValueError('algorithms: distill() adds its own Distillation; use tasks= for several.')
    kd_loss_fn = _kd_loss_fn(kd_loss, temperature)
    spec = None
    if search is not None:
        if tasks is not None:
            raise ValueError('search: not available with tasks=; search each task in a call of its own.')
        if options.get('teacher_cache') is not None:
            raise ValueError('search: not available with teacher_cache= (each candidate trains a student of its own).')
        spec = search_spec(
            search,
            kd_loss=kd_loss,
            temperature=temperature,
            kd_loss_weight=kd_loss_weight,
            org_loss_weight=org_loss_weight,
            max_duration=max_duration,
        )
        _check_settings(integers={}, flags={}, num_classes=None, max_duration=spec.max_duration)

    # Teachers: resolved (checkpoints loaded) and their state recorded, to be given back exactly.
    multitask = tasks is not None
    if multitask:
        if teacher is not None:
            raise ValueError('teacher: with tasks=, each task names its own teachers; pass teacher=None.')
        task_list = _resolve_tasks(tasks, options)
        teacher_modules = [t for task in task_list for t in task.teachers]
    else:
        if teacher is None:
            raise TypeError('teacher is required (a model, a list of models, or {checkpoint: model}).')
        teacher_modules = _resolve(teacher, 'teacher')
    if not (isinstance(student, nn.Module)):
        raise TypeError(
            'student must be an nn.Module, a ComposerModel or a Hugging Face PreTrainedModel, '
            f'got {type(student).__name__}.'
        )
    student_parameters = {id(p) for p in student.parameters()}
    for i, module in enumerate(teacher_modules):
        if module is student or any(id(p) in student_parameters for p in module.parameters()):
            raise ValueError(
                f'teacher {i} shares parameters with the student; a teacher must be a separate, fixed model '
                '(copy it with copy.deepcopy if it starts from the same weights).'
            )

    # A Hugging Face student reads its labels from 'labels': a datasets.Dataset's usual 'label' column is renamed.
    hugging_face = is_hugging_face(student)
    train_data = prepare_dataset(train_data, 'train_data', hugging_face)
    if isinstance(eval_data, Mapping):
        eval_data = {k: prepare_dataset(v, f'eval_data[{k!r}]', hugging_face) for k, v in eval_data.items()}
    else:
        eval_data = prepare_dataset(eval_data, 'eval_data', hugging_face)
    train_loader = as_loader(train_data, 'train_data', batch_size, shuffle=True, seed=seed)
    splits = eval_loaders(eval_data, eval_batch_size, seed)
    if spec is not None:
        check_split(spec, list(splits))
        # The report's headline is the first split: one the settings were not chosen on.
        splits = {**{k: v for k, v in splits.items() if k != spec.split}, spec.split: splits[spec.split]}
    sample = first_batch(train_loader, 'train_data')
    check_batch(sample, 'train_data', hugging_face)
    for split, loader in splits.items():
        check_batch(first_batch(loader, f'eval_data[{split!r}]'), f'eval_data[{split!r}]', hugging_face)

    wrapped_student = composer_student(student, sample, num_classes, multitask)
    check_optimizer(optimizer, wrapped_student, lr=lr, weight_decay=weight_decay)
    student_classes = getattr(wrapped_student, 'num_classes', None)
    if multitask:
        entries = _prepare_tasks(task_list, sample, options, kd_loss, temperature)
        distillations = task_distillations(task_list, org_loss_weight=org_loss_weight)
    else:
        entries = [
            (
                module,
                evaluable_teacher(module, f'teacher {i}', sample, student_classes, None, options.get('input_key')),
                describe_module(module),
            )
            for i, module in enumerate(teacher_modules)
        ]

        def distillation(candidate: Candidate) -> Distillation:
            return Distillation(
                teachers=teacher_modules,
                kd_loss_fn=candidate.loss(),
                org_loss_weight=candidate.org_loss_weight,
                kd_loss_weight=candidate.kd_loss_weight,
                temperature=candidate.temperature,
                **options,
            )

        if spec is None:
            distillations = [
                Distillation(
                    teachers=teacher_modules,
                    kd_loss_fn=kd_loss_fn,
                    org_loss_weight=org_loss_weight,
                    kd_loss_weight=kd_loss_weight,
                    temperature=temperature,
                    **options,
                )
            ]
        else:
            for candidate in spec.candidates:  # every candidate's Distillation is checked before anything trains
                distillation(candidate)

    # Everything is checked; from here on the models are used. The teachers' state is put back at the end.
    frozen, placement = FrozenTeachers(teacher_modules), _Placement(teacher_modules)
    frozen.freeze()
    try:
        alone = copy.deepcopy(wrapped_student) if baseline or spec is not None else None
        alone_algorithms = copy.deepcopy(algorithms) if baseline else []
        common = dict(
            max_duration=max_duration,
            seed=seed,
            precision=precision,
            device=device,
            progress_bar=progress_bar,
            **trainer_kwargs,
        )
        search_report = None
        if spec is not None:
            assert alone is not None  # the student as given: every candidate starts from it
            search_report = _search(
                spec,
                alone,
                train_loader,
                splits[spec.split],
                lambda candidate: [*copy.deepcopy(algorithms), distillation(candidate)],
                lambda: copy.deepcopy(algorithms),
                baseline=baseline,
                optimizer=optimizer,
                lr=lr,
                weight_decay=weight_decay,
                common={**common, 'max_duration': spec.max_duration},
            )
            distillations = [distillation(search_report.best)]
        # The optimizer given is the distilled student's own; the student alone gets a fresh one like it.
        trainer = make_trainer(
            wrapped_student,
            train_loader,
            optimizer=optimizer
            if isinstance(optimizer, torch.optim.Optimizer)
            else build_optimizer(optimizer, wrapped_student, lr=lr, weight_decay=weight_decay),
            algorithms=[*algorithms, *distillations],
            callbacks=callbacks,
            loggers=loggers,
            save_folder=save_folder,
            eval_dataloaders=splits if eval_interval is not None else None,
            eval_interval=eval_interval if eval_interval is not None else 1,
            **common,
        )

        def student_alone() -> tuple[ComposerModel, Trainer]:
            assert alone is not None
            alone_optimizer = build_optimizer(optimizer, alone, lr=lr, weight_decay=weight_decay)
            return alone, make_trainer(
                alone, train_loader, optimizer=alone_optimizer, algorithms=alone_algorithms, **common
            )

        def evaluate(model: nn.Module) -> dict[str, dict[str, float]]:
            return evaluate_model(model, splits, device=device, precision=precision, seed=seed)

        speed_batch = None
        if measure_speed and entries[0][1] is not None:  # a teacher is timed as it is evaluated
            speed_batch = first_batch(next(iter(splits.values())), 'eval_data') if splits else sample
        report = fit_and_report(
            'distill()',
            wrapped_student,
            trainer,
            evaluate,
            seed=seed,
            teachers=[
                TeacherEntry(model=wrapped or module, description=description, evaluated=wrapped is not None)
                for module, wrapped, description in entries
            ],
            student_description=describe_module(student),
            student_alone=student_alone if baseline else None,
            speed_batch=speed_batch,
            started=started,
        )
        report.search = search_report
    finally:
        frozen.restore()
        placement.restore()
    return DistillResult(student, report)


def _search(
    spec: Any,
    initial: ComposerModel,
    train_loader: Any,
    split_loader: Any,
    distilled_algorithms: Any,
    alone_algorithms: Any,
    *,
    baseline: bool,
    optimizer: Any,
    lr: float,
    weight_decay: float,
    common: Mapping[str, Any],
) -> SearchReport:
    """Train a copy of ``initial`` for each candidate (and alone, with ``baseline``) and score it on one split.

    The candidates' trainers get no evaluation data: the only evaluation is :func:`evaluate_model` on the
    selection split, after each fit.
    """
    seed, device, precision = common['seed'], common.get('device'), common.get('precision')

    def fit_and_score(algorithms: list[Algorithm]) -> tuple[float, str]:
        model = copy.deepcopy(initial)
        trainer = make_trainer(
            model,
            train_loader,
            optimizer=build_optimizer(optimizer, model, lr=lr, weight_decay=weight_decay),
            algorithms=algorithms,
            **common,
        )
        reproducibility.seed_all(seed)
        trainer.fit()
        trainer.close()
        metrics = evaluate_model(model, {spec.split: split_loader}, device=device, precision=precision, seed=seed)
        values = metrics[spec.split]
        metric = spec.metric or next(iter(values), None)
        if metric not in values:
            raise ValueError(f'search[metric]: the student has no metric {metric!r} (it has: {", ".join(values)}).')
        return values[metric], metric

    return run_search(
        spec,
        lambda candidate: fit_and_score(distilled_algorithms(candidate)),
        reference=(lambda: fit_and_score(alone_algorithms())) if baseline else None,
    )
