"""Multi-task distillation: a student with one head per task, each head taught by its own teachers.

A task is taught by one named :class:`~composer_kd.Distillation`: its teachers, the student's and the teachers'
logits keys, its weight and its temperature. Several named instances share one trainer, each adding its own
``'kd/<task>'`` term to the loss while the model's own loss is counted once (see
:func:`~composer_kd.combine_losses`). :class:`MultiTaskClassifier` is a ready student (or single-task teacher)
for data whose batches are flat dicts ``{'inputs': x, '<task>': labels, ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from composer.models import ComposerModel
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from composer_kd.distillation import Distillation, KDLossFn
from composer_kd.losses import IGNORE_INDEX, KLDivergence, cross_entropy_with_hidden_labels
from composer_kd.models.outputs import Key
from composer_kd.models.teachers import TeacherSpec
from composer_kd.schedules import ScheduleOrValue

__all__ = ['DistillationTask', 'MultiTaskClassifier', 'TaskAccuracy', 'task_distillations']


class TaskAccuracy(MulticlassAccuracy):
    """Accuracy on one task's labels of a multi-task batch, skipping hidden labels (``IGNORE_INDEX``).

    Args:
        task (str): The task, which names both the model's output and the batch's labels.
        num_classes (int): The task's number of classes.

    Returns:
        torch.Tensor: From ``compute()``, the share of correct predictions among the known labels.

    Example:
        .. testcode::

            import torch
            from composer_kd import TaskAccuracy
            from composer_kd.losses import IGNORE_INDEX

            metric = TaskAccuracy('parity', num_classes=2)
            logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
            metric.update(logits, torch.tensor([0, 0, IGNORE_INDEX]))  # the third label is hidden
            assert metric.compute().item() == 0.5
    """

    def __init__(self, task: str, num_classes: int):
        super().__init__(num_classes=num_classes, average='micro', ignore_index=IGNORE_INDEX)
        self.task = task


class MultiTaskClassifier(ComposerModel):
    """A shared trunk and one classification head per task, for flat dict batches ``{'inputs': x, task: y}``.

    ``forward`` returns ``{task: logits}``; ``loss`` returns ``{'ce/<task>': cross-entropy}`` over the examples
    whose label for that task is known (Composer, and ``Distillation``, sum the terms); the metrics are
    ``'accuracy/<task>'``. With a single head it is a single-task teacher that reads its own labels from
    multi-task batches.

    Args:
        trunk (nn.Module): Maps ``batch['inputs']`` to the features every head reads.
        heads (Mapping[str, nn.Module]): ``{task: head}``; each head maps the features to that task's logits.
        num_classes (Mapping[str, int], optional): Classes per task, for the metrics. Default: each head's
            ``out_features`` (so ``nn.Linear`` heads need nothing here).

    Returns:
        dict[str, torch.Tensor]: From a forward pass, ``{task: logits}``.

    Example:
        .. testcode::

            import torch
            from composer_kd.multitask import MultiTaskClassifier

            model = MultiTaskClassifier(
                torch.nn.Flatten(), {'digit': torch.nn.Linear(64, 10), 'parity': torch.nn.Linear(64, 2)}
            )
            batch = {'inputs': torch.randn(4, 64), 'digit': torch.arange(4), 'parity': torch.tensor([0, 1, 0, 1])}
            outputs = model(batch)
            assert outputs['digit'].shape == (4, 10) and set(model.loss(outputs, batch)) == {'ce/digit', 'ce/parity'}
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Mapping[str, nn.Module],
        num_classes: Optional[Mapping[str, int]] = None,
    ):
        super().__init__()
        if not heads:
            raise ValueError('heads: expected at least one {task: head}, got none.')
        classes = dict(num_classes or {})
        for task, head in heads.items():
            if not isinstance(task, str) or task == 'inputs':
                raise ValueError(f"heads: task names must be strings other than 'inputs', got {task!r}.")
            if not isinstance(head, nn.Module):
                raise TypeError(f'heads[{task!r}] must be an nn.Module, got {type(head).__name__}.')
            if task not in classes:
                width = getattr(head, 'out_features', None)
                if not isinstance(width, int):
                    raise ValueError(
                        f'num_classes[{task!r}] is needed: head {type(head).__name__} has no out_features.'
                    )
                classes[task] = width
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))
        self.num_classes = {task: classes[task] for task in heads}

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        features = self.trunk(batch['inputs'])
        return {task: head(features) for task, head in self.heads.items()}

    def loss(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *args, **kwargs) -> dict:
        missing = [task for task in self.heads if task not in batch]
        if missing:
            raise KeyError(f'The batch has no labels for task(s) {missing}; its keys are {sorted(batch)}.')
        return {f'ce/{task}': cross_entropy_with_hidden_labels(outputs[task], batch[task]) for task in self.heads}

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {f'accuracy/{task}': TaskAccuracy(task, n) for task, n in self.num_classes.items()}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        task = metric.task  # type: ignore[attr-defined]
        metric.update(outputs[task], batch[task])


@dataclass
class DistillationTask:
    """One task of a multi-task student and what teaches it: the arguments of its named ``Distillation``.

    Args:
        name (str): The task; names the loss term ``'kd/<name>'`` and, by default, the student's output head.
        teachers: The task's teacher(s), in any form ``Distillation`` takes.
        kd_loss_weight (float | Schedule, optional): Weight of this task's distillation term. Default: ``1.0``.
        temperature (float | Schedule, optional): This task's temperature. Default: ``None``, the loss's own
            (``kd_loss_fn`` or ``KLDivergence(temperature=4.0)``).
        kd_loss_fn (Callable, optional): This task's loss between logits. Default: ``KLDivergence``.
        student_logits_key (int | str | Callable, optional): The student's logits for this task. Default: ``name``.
        teacher_logits_key (int | str | Callable, optional): The teachers' logits. Default: the student's key, or a
            teacher's output itself when it is a bare tensor.
        options (dict, optional): Any other ``Distillation`` keyword (``input_key``, ``start``, ...).

    Example:
        .. testcode::

            import torch
            from composer_kd import DistillationTask, task_distillations

            parity_teacher = torch.nn.Linear(64, 2)
            task = DistillationTask('parity', parity_teacher, kd_loss_weight=0.5, temperature=2.0)
            (distillation,) = task_distillations([task], org_loss_weight=0.5)
            assert distillation.name == 'parity' and distillation.kd_loss_weight == 0.5
    """

    name: str
    teachers: TeacherSpec
    kd_loss_weight: ScheduleOrValue = 1.0
    temperature: Optional[ScheduleOrValue] = None
    kd_loss_fn: Optional[KDLossFn] = None
    student_logits_key: Optional[Key] = None
    teacher_logits_key: Optional[Key] = None
    options: dict[str, Any] = field(default_factory=dict)


def task_distillations(
    tasks: Sequence[Union[DistillationTask, Mapping[str, Any]]], org_loss_weight: ScheduleOrValue = 1.0
) -> list[Distillation]:
    """One named ``Distillation`` per task, to pass together in a ``Trainer``'s ``algorithms``.

    The model's own loss is weighted by ``org_loss_weight`` once: the first task's instance carries it and the
    others leave the model's loss as it is (weight 1.0), so that

    ``total = org_loss_weight * loss + sum_t kd_loss_weight_t * kd_t``.

    Args:
        tasks (Sequence[DistillationTask | dict]): The tasks, as :class:`DistillationTask` or its keyword dict.
        org_loss_weight (float | Schedule, optional): Weight of the model's own loss. Default: ``1.0``.

    Returns:
        list[Distillation]: One per task, in order.

    Raises:
        ValueError: If there is no task, or two share a name; a task's own problem names it (``tasks[1]: ...``).

    Example:
        .. testcode::

            import torch
            from composer_kd.multitask import task_distillations

            from composer_kd.multitask import DistillationTask

            inputs = {'input_key': 'inputs'}  # plain modules read the images of a {'inputs': ..., task: ...} batch
            algorithms = task_distillations(
                [
                    DistillationTask('digit', torch.nn.Linear(64, 10), temperature=4.0, options=inputs),
                    {'name': 'parity', 'teachers': torch.nn.Linear(64, 2), 'kd_loss_weight': 0.5, 'options': inputs},
                ],
                org_loss_weight=0.1,
            )
            assert [a.name for a in algorithms] == ['digit', 'parity']
    """
    if not tasks:
        raise ValueError('tasks: expected at least one task, got none.')
    algorithms, seen = [], set()
    for i, task in enumerate(tasks):
        try:
            if isinstance(task, Mapping):
                task = DistillationTask(**task)
            elif not isinstance(task, DistillationTask):
                raise TypeError(f'expected a DistillationTask or a dict of its fields, got {type(task).__name__}')
            if task.name in seen:
                raise ValueError(f'the task name {task.name!r} is used twice')
            seen.add(task.name)
            kd_loss_fn = task.kd_loss_fn
            if kd_loss_fn is None:
                constant = isinstance(task.temperature, (int, float)) and not isinstance(task.temperature, bool)
                kd_loss_fn = KLDivergence(temperature=task.temperature) if constant else KLDivergence()
            algorithms.append(
                Distillation(
                    teachers=task.teachers,
                    kd_loss_fn=kd_loss_fn,
                    org_loss_weight=org_loss_weight if i == 0 else 1.0,
                    kd_loss_weight=task.kd_loss_weight,
                    temperature=task.temperature,
                    student_logits_key=task.student_logits_key if task.student_logits_key is not None else task.name,
                    teacher_logits_key=task.teacher_logits_key,
                    name=task.name,
                    **task.options,
                )
            )
        except (TypeError, ValueError) as e:
            raise type(e)(f'tasks[{i}]: {e}') from e
    return algorithms
