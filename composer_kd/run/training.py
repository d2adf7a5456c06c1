"""The Composer objects every run is built from, by name: devices, precisions, optimizers, and the ``Trainer``.

:func:`composer_kd.distill` and recipe runs build their optimizers with :func:`build_optimizer` and their
trainers with :func:`make_trainer`, so a student trained by either is trained the same way; recipes also look
their algorithms, loggers and schedulers up here by class name.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import composer.optim
import torch
from composer import Trainer
from composer.core import Algorithm, Callback, Evaluator, Precision
from composer.loggers import LoggerDestination
from torch import nn

__all__ = [
    'COMPOSER_MODULES',
    'DEVICES',
    'PRECISIONS',
    'build_optimizer',
    'check_optimizer',
    'composer_algorithm',
    'composer_class',
    'composer_classes',
    'composer_logger',
    'composer_scheduler',
    'make_trainer',
    'optimizer_class',
    'quiet_plumbing',
    'optimizer_names',
]

#: The devices a run may name, as Composer's ``Trainer(device=...)`` takes them; ``None`` picks the accelerator.
DEVICES = ('cpu', 'gpu', 'mps', 'tpu', 'neuron')

#: The precisions a run may name: the values of Composer's ``Precision``; ``None`` is the device's default.
PRECISIONS = tuple(p.value for p in Precision)


#: Where Composer keeps each kind of object a recipe names by class: ``{kind: module}``.
COMPOSER_MODULES = {'algorithm': 'composer.algorithms', 'logger': 'composer.loggers', 'scheduler': 'composer.optim'}


def composer_classes(kind: str) -> list[str]:
    """The public class names of Composer's algorithms, loggers or schedulers, sorted.

    Args:
        kind (str): A key of :data:`COMPOSER_MODULES`: ``'algorithm'``, ``'logger'`` or ``'scheduler'``.

    Returns:
        list[str]: The names :func:`composer_class` finds; of ``composer.optim``, those ending in ``Scheduler``.

    Example:
        .. testcode::

            from composer_kd.run.training import composer_classes

            assert 'LinearScheduler' in composer_classes('scheduler')
    """
    if kind not in COMPOSER_MODULES:
        raise ValueError(f'kind must be one of {", ".join(COMPOSER_MODULES)}, got {kind!r}.')
    # composer.algorithms (dozens of algorithms) is loaded only when a run names one.
    module = importlib.import_module(COMPOSER_MODULES[kind])
    suffix = 'Scheduler' if kind == 'scheduler' else ''
    return sorted(n for n in getattr(module, '__all__', dir(module)) if n[:1].isupper() and n.endswith(suffix))


def composer_class(kind: str, name: str) -> Optional[type]:
    """The Composer class of ``kind`` named ``name``, or ``None``.

    Args:
        kind (str): ``'algorithm'``, ``'logger'`` or ``'scheduler'``.
        name (str): A class name, e.g. ``'LabelSmoothing'``.

    Returns:
        type | None: The class, or ``None`` if Composer has none of that kind and name.

    Example:
        .. testcode::

            from composer_kd.run.training import composer_class

            assert composer_class('algorithm', 'LabelSmoothing').__name__ == 'LabelSmoothing'
            assert composer_class('logger', 'LabelSmoothing') is None
    """
    if name not in composer_classes(kind):
        return None
    return getattr(importlib.import_module(COMPOSER_MODULES[kind]), name)


def composer_algorithm(name: str) -> Optional[type]:
    """The class ``composer.algorithms.<name>``, or ``None``: :func:`composer_class` of ``'algorithm'``.

    Args:
        name (str): A class name, e.g. ``'LabelSmoothing'``.

    Returns:
        type | None: The algorithm class, or ``None`` if Composer has none of that name.

    Example:
        .. testcode::

            from composer_kd.run.training import composer_algorithm

            assert composer_algorithm('Distillation') is None
    """
    return composer_class('algorithm', name)


def composer_logger(name: str) -> Optional[type]:
    """The logger destination class ``composer.loggers.<name>``, or ``None``: :func:`composer_class` of ``'logger'``.

    Args:
        name (str): A class name, e.g. ``'InMemoryLogger'``.

    Returns:
        type | None: The logger destination class, or ``None`` if Composer has none of that name.

    Example:
        .. testcode::

            from composer_kd.run.training import composer_logger

            assert composer_logger('InMemoryLogger').__name__ == 'InMemoryLogger'
    """
    return composer_class('logger', name)


def composer_scheduler(name: str) -> Optional[type]:
    """The scheduler class ``composer.optim.<name>``, or ``None``: :func:`composer_class` of ``'scheduler'``.

    Args:
        name (str): A class name ending in ``Scheduler``, e.g. ``'CosineAnnealingScheduler'``.

    Returns:
        type | None: The scheduler class, or ``None`` if Composer has none of that name.

    Example:
        .. testcode::

            from composer_kd.run.training import composer_scheduler

            assert composer_scheduler('CosineAnnealingScheduler').__name__ == 'CosineAnnealingScheduler'
    """
    return composer_class('scheduler', name)


def optimizer_class(name: str) -> Optional[type[torch.optim.Optimizer]]:
    """The optimizer class ``composer.optim.<name>`` or ``torch.optim.<name>``, or ``None``.

    Args:
        name (str): A class name, e.g. ``'Adam'`` or ``'DecoupledAdamW'``.

    Returns:
        type | None: The optimizer class (Composer's first), or ``None`` if neither has one of that name.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.training import optimizer_class

            assert optimizer_class('Adam') is torch.optim.Adam and optimizer_class('Adamm') is None
    """
    for module in (composer.optim, torch.optim):
        candidate = getattr(module, name, None)
        if isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
            return candidate
    return None


def optimizer_names() -> list[str]:
    """Every name :func:`optimizer_class` finds, sorted.

    Returns:
        list[str]: The optimizer class names of ``composer.optim`` and ``torch.optim``.

    Example:
        .. testcode::

            from composer_kd.run.training import optimizer_names

            assert {'Adam', 'DecoupledAdamW', 'SGD'} <= set(optimizer_names())
    """
    names = {n for n in dir(torch.optim) if optimizer_class(n) is not None and n != 'Optimizer'}
    return sorted(names | {n for n in dir(composer.optim) if optimizer_class(n) is not None})


def build_optimizer(
    optimizer: Union[str, type, torch.optim.Optimizer],
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """A fresh optimizer over ``model``'s parameters.

    Args:
        optimizer (str | type | Optimizer): A class name (see :func:`optimizer_class`), an optimizer class, or an
            optimizer whose kind and settings are copied (``lr`` and the others are then its own).
        model (nn.Module): The model whose parameters it optimizes.
        lr (float): The learning rate.
        weight_decay (float, optional): The weight decay. Default: ``0.0``.
        **kwargs: Other arguments of the optimizer class, e.g. ``betas``.

    Returns:
        torch.optim.Optimizer: The optimizer.

    Raises:
        ValueError: For a name that is no optimizer's.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.training import build_optimizer

            model = torch.nn.Linear(4, 2)
            optimizer = build_optimizer('Adam', model, lr=0.01)
            twin = build_optimizer(optimizer, torch.nn.Linear(4, 2), lr=1.0)  # Adam at lr 0.01 again
            assert type(twin) is torch.optim.Adam and twin.defaults['lr'] == 0.01
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return type(optimizer)(model.parameters(), **optimizer.defaults)
    cls = optimizer_class(optimizer) if isinstance(optimizer, str) else optimizer
    if cls is None:
        raise ValueError(f'unknown optimizer {optimizer!r} (expected a class name of composer.optim or torch.optim)')
    return cls(model.parameters(), lr=lr, weight_decay=weight_decay, **kwargs)


def check_optimizer(optimizer: Any, model: nn.Module, *, lr: Any, weight_decay: Any) -> None:
    """Refuse, by name, what :func:`build_optimizer` could not build for ``model``, before anything is trained.

    Args:
        optimizer (Any): What is to be given to :func:`build_optimizer`; an optimizer instance must hold only
            ``model``'s parameters.
        model (nn.Module): The model to be trained.
        lr (Any): The learning rate; a number > 0.
        weight_decay (Any): The weight decay; a number >= 0.

    Returns:
        None: It returns when everything is fine.

    Raises:
        TypeError: If ``optimizer`` is no name, class or instance of an optimizer.
        ValueError: If a name is unknown, an instance holds other parameters, or a number is out of range.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.training import check_optimizer

            check_optimizer('Adam', torch.nn.Linear(4, 2), lr=0.01, weight_decay=0.0)
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        if any(id(p) not in own for group in optimizer.param_groups for p in group['params']):
            raise ValueError("optimizer: it holds parameters that are not the student's.")
        return
    if isinstance(optimizer, str):
        if optimizer_class(optimizer) is None:
            raise ValueError(
                f'optimizer: unknown optimizer {optimizer!r} (expected a class name of composer.optim or torch.optim, '
                'an optimizer class, or an optimizer over the student)'
            )
    elif not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        raise TypeError(f'optimizer must be a name, an Optimizer class or instance, got {type(optimizer).__name__}.')
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        raise ValueError(f'lr must be a number > 0, got {lr!r}.')
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f'weight_decay must be a number >= 0, got {weight_decay!r}.')


#: Composer's warnings about choices the package makes on purpose: an evaluation-only Trainer has no optimizer,
#: and a last batch smaller than the microbatch size is not split.
PLUMBING_WARNINGS = ('No optimizer was specified', 'Cannot split tensor of length')


@contextlib.contextmanager
def quiet_plumbing() -> Iterator[None]:
    """Silence Composer's warnings about the package's own plumbing (:data:`PLUMBING_WARNINGS`) inside the block.

    Example:
        .. testcode::

            import warnings
            from composer_kd.run.training import quiet_plumbing

            with warnings.catch_warnings():
                warnings.simplefilter('error')
                with quiet_plumbing():
                    warnings.warn('No optimizer was specified. Defaulting to DecoupledSGDW(lr=0.1)')
    """
    with warnings.catch_warnings():
        for message in PLUMBING_WARNINGS:
            warnings.filterwarnings('ignore', message=message)
        yield


def make_trainer(
    model: nn.Module,
    train_dataloader: Any,
    *,
    max_duration: Any,
    optimizer: torch.optim.Optimizer,
    seed: int,
    eval_dataloaders: Optional[Mapping[str, Any]] = None,
    eval_interval: Union[str, int] = 1,
    algorithms: Sequence[Algorithm] = (),
    callbacks: Sequence[Callback] = (),
    loggers: Sequence[LoggerDestination] = (),
    device: Optional[Any] = None,
    precision: Optional[Any] = None,
    progress_bar: bool = False,
    save_folder: Optional[str] = None,
    **trainer_kwargs: Any,
) -> Trainer:
    """An ordinary Composer ``Trainer`` for one model of a run: one evaluator per split, nothing on the console.

    Every trainer of :func:`composer_kd.distill` and of a recipe run (teachers trained first, the distilled
    student, the student alone) is this one; what distils is the ``Distillation`` among ``algorithms``.

    Args:
        model (nn.Module): The ``ComposerModel`` to train.
        train_dataloader (DataLoader | DataSpec): Its training data.
        max_duration (str | int | Time): Training budget.
        optimizer (torch.optim.Optimizer): Its optimizer (see :func:`build_optimizer`).
        seed (int): The trainer's seed.
        eval_dataloaders (Mapping[str, DataLoader | DataSpec], optional): Data to evaluate on during training, by
            split name. Default: none.
        eval_interval (str | int, optional): How often to evaluate them. Default: ``1`` (every epoch).
        algorithms (Sequence[Algorithm], optional): Composer algorithms, ``Distillation`` among them to distil.
        callbacks (Sequence[Callback], optional): Callbacks.
        loggers (Sequence[LoggerDestination], optional): Logger destinations.
        device (str | Device, optional): Composer device. Default: the accelerator if any.
        precision (str | Precision, optional): Composer precision. Default: the device's.
        progress_bar (bool, optional): Composer's progress bar. Default: ``False``.
        save_folder (str, optional): Where checkpoints go. Default: none saved.
        **trainer_kwargs: Any other ``Trainer`` argument (``schedulers``, ``save_interval``, ...).

    Returns:
        Trainer: Built, not yet fit.

    Example:
        .. testcode::

            import torch
            from composer.models import ComposerClassifier
            from torch.utils.data import DataLoader, TensorDataset
            from composer_kd.run.training import build_optimizer, make_trainer

            model = ComposerClassifier(torch.nn.Linear(4, 3), num_classes=3)
            data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
            trainer = make_trainer(
                model, data, max_duration='2ba', optimizer=build_optimizer('SGD', model, lr=0.1), seed=0, device='cpu'
            )
            trainer.fit()
            assert int(trainer.state.timestamp.batch) == 2
    """
    evaluators = [Evaluator(label=split, dataloader=loader) for split, loader in (eval_dataloaders or {}).items()]
    return Trainer(
        model=model,
        train_dataloader=train_dataloader,
        eval_dataloader=evaluators or None,
        eval_interval=eval_interval,
        max_duration=max_duration,
        optimizers=optimizer,
        algorithms=list(algorithms),
        callbacks=list(callbacks),
        loggers=list(loggers),
        progress_bar=progress_bar,
        log_to_console=False,
        precision=precision,
        device=device,
        seed=seed,
        save_folder=save_folder,
        **trainer_kwargs,
    )
