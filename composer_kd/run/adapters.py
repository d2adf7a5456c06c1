"""Models and data as a Composer ``Trainer`` takes them: what lets :func:`composer_kd.distill` accept plain ones.

A plain ``nn.Module`` classifier becomes a ``ComposerClassifier`` (:func:`classifier`), a Hugging Face model a
``HuggingFaceModel`` (:func:`hugging_face_classifier`), both scoring accuracy on the labels that are not hidden
(:data:`~composer_kd.losses.IGNORE_INDEX`); a dataset becomes a ``DataLoader`` with Composer's seeded sampler.
Recipes build their models with the same two wrappers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from composer.core import DataSpec
from composer.models import ComposerClassifier, ComposerModel, HuggingFaceModel
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from composer_kd.losses import IGNORE_INDEX, cross_entropy_with_hidden_labels
from composer_kd.models.teachers import teacher_logits
from composer_kd.multitask import MultiTaskClassifier

__all__ = [
    'as_loader',
    'check_batch',
    'classifier',
    'composer_student',
    'describe_module',
    'eval_loaders',
    'evaluable_teacher',
    'first_batch',
    'hugging_face_classifier',
    'is_hf_pretrained',
    'is_hugging_face',
    'prepare_dataset',
]


def classifier(module: nn.Module, num_classes: int) -> ComposerClassifier:
    """``module`` as a ``ComposerClassifier`` whose loss and accuracy skip hidden labels (``IGNORE_INDEX``).

    Args:
        module (nn.Module): Maps a batch's inputs to ``[batch, num_classes]`` logits.
        num_classes (int): Number of classes.

    Returns:
        ComposerClassifier: Trained on ``(inputs, targets)`` batches with
        :func:`~composer_kd.losses.cross_entropy_with_hidden_labels`, scored by accuracy.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.adapters import classifier

            model = classifier(torch.nn.Linear(4, 3), num_classes=3)
            assert model.num_classes == 3
    """

    def accuracy() -> MulticlassAccuracy:
        return MulticlassAccuracy(num_classes=num_classes, average='micro', ignore_index=IGNORE_INDEX)

    return ComposerClassifier(
        module,
        num_classes=num_classes,
        train_metrics=accuracy(),
        val_metrics=accuracy(),
        loss_fn=cross_entropy_with_hidden_labels,
    )


def hugging_face_classifier(model: nn.Module, num_classes: int) -> HuggingFaceModel:
    """A Hugging Face sequence classifier as a ``HuggingFaceModel`` with its logits and accuracy.

    Args:
        model (nn.Module): A ``transformers`` model for sequence classification.
        num_classes (int): Its number of labels.

    Returns:
        HuggingFaceModel: Its loss is the model's own; accuracy skips hidden labels (``IGNORE_INDEX``).

    Example:
        .. testcode::

            from transformers import BertConfig, BertForSequenceClassification
            from composer_kd.run.adapters import hugging_face_classifier

            config = BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
            )
            model = hugging_face_classifier(BertForSequenceClassification(config), num_classes=2)
    """
    metric = MulticlassAccuracy(num_classes=num_classes, average='micro', ignore_index=IGNORE_INDEX)
    return HuggingFaceModel(model, use_logits=True, metrics=[metric])


def is_hf_pretrained(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel``.

    Args:
        model (Any): Anything.

    Returns:
        bool: ``True`` for a ``transformers`` model.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.adapters import is_hf_pretrained

            assert not is_hf_pretrained(torch.nn.Linear(2, 2))
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def is_hugging_face(model: Any) -> bool:
    """Whether ``model`` is trained as a Hugging Face model: a ``PreTrainedModel``, or one in a ``HuggingFaceModel``.

    Args:
        model (Any): Anything.

    Returns:
        bool: ``True`` when its loss comes from the model itself, computed from the batch's ``labels``.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.adapters import is_hugging_face

            assert not is_hugging_face(torch.nn.Linear(2, 2))
    """
    return isinstance(model, HuggingFaceModel) or is_hf_pretrained(model)


def _is_hf_dataset(data: Any) -> bool:
    return type(data).__module__.split('.')[0] == 'datasets' and hasattr(data, 'column_names')


def prepare_dataset(data: Any, name: str, hugging_face: bool) -> Any:
    """A Hugging Face ``datasets.Dataset`` made ready for a Composer ``Trainer``; any other data as it is.

    Its usual ``label`` column is renamed ``labels`` for a Hugging Face model (which computes its loss from
    ``labels``), in a new dataset: the one passed in is unchanged. A dataset still giving Python lists (no
    ``set_format('torch')``) is refused, naming the call to make.

    Args:
        data (Any): Training or evaluation data.
        name (str): What the data are called, for messages (``'train_data'``).
        hugging_face (bool): Whether the model trained or evaluated on them is a Hugging Face model.

    Returns:
        Any: The data, or a renamed view of the ``datasets.Dataset``.

    Raises:
        TypeError: If a ``datasets.Dataset`` gives Python lists rather than tensors.

    Example:
        .. testcode::

            import datasets
            from composer_kd.run.adapters import prepare_dataset

            data = datasets.Dataset.from_dict({'input_ids': [[1, 2], [3, 4]], 'label': [0, 1]}).with_format('torch')
            ready = prepare_dataset(data, 'train_data', hugging_face=True)
            assert ready.column_names == ['input_ids', 'labels'] and data.column_names == ['input_ids', 'label']
    """
    if not _is_hf_dataset(data):
        return data
    if data.format.get('type') is None:
        columns = [column for column, feature in data.features.items() if getattr(feature, 'dtype', None) != 'string']
        raise TypeError(
            f'{name}: this datasets.Dataset gives Python lists, which batch into lists of tensors whose batch size '
            f"Composer cannot tell; give tensors: {name}.set_format('torch', columns={columns!r}) (or "
            f"{name} = {name}.with_format('torch', columns=...)), keeping the columns the model takes."
        )
    if hugging_face and 'label' in data.column_names and 'labels' not in data.column_names:
        data = data.rename_column('label', 'labels')
    return data


def check_batch(batch: Any, name: str, hugging_face: bool) -> None:
    """Refuse, by column, a batch a Composer ``Trainer`` would fail on: lists for tensors, no ``labels``.

    Args:
        batch (Any): The first batch of the data.
        name (str): What the data are called, for messages (``'train_data'``).
        hugging_face (bool): Whether a Hugging Face model is trained on them (its loss needs ``labels``).

    Raises:
        TypeError: If a column of a dict batch is a list of tensors or numbers rather than a tensor.
        ValueError: If a Hugging Face model would get no ``labels`` column.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.adapters import check_batch

            check_batch({'input_ids': torch.zeros(2, 3), 'labels': torch.zeros(2)}, 'train_data', hugging_face=True)
            try:
                check_batch({'input_ids': torch.zeros(2, 3), 'label': torch.zeros(2)}, 'train_data', True)
            except ValueError as error:
                assert "'label'" in str(error)
    """
    if not isinstance(batch, Mapping):
        return
    for column, value in batch.items():
        if isinstance(value, (list, tuple)) and value and not isinstance(value[0], str):
            raise TypeError(
                f'{name}: batch column {column!r} is a list of {len(value)} {type(value[0]).__name__}s, not a '
                'tensor: the examples hold Python lists, which Composer cannot batch (nor count). Give tensors: '
                "for a datasets.Dataset, set_format('torch', columns=[...]); otherwise a collate_fn that stacks them."
            )
    if hugging_face and 'labels' not in batch:
        found = ', '.join(repr(k) for k in batch)
        if 'label' in batch:
            hint = "rename it: dataset.rename_column('label', 'labels') for a datasets.Dataset"
        else:
            hint = "add the class indices as a 'labels' column"
        raise ValueError(
            f"{name}: a Hugging Face model computes its loss and accuracy from a 'labels' column, and the batches "
            f'have {found}; {hint}.'
        )


def describe_module(model: Any) -> str:
    """What ``model`` is, in a few words for a report: its class, and the class it wraps.

    Args:
        model (Any): A model.

    Returns:
        str: E.g. ``'ComposerClassifier(Sequential)'`` or ``'Linear'``.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.adapters import classifier, describe_module

            assert describe_module(classifier(torch.nn.Linear(4, 3), 3)) == 'ComposerClassifier(Linear)'
    """
    if isinstance(model, ComposerClassifier):
        return f'ComposerClassifier({type(model.module).__name__})'
    if isinstance(model, HuggingFaceModel):
        return f'HuggingFaceModel({type(model.model).__name__})'
    return type(model).__name__


def as_loader(data: Any, name: str, batch_size: int, shuffle: bool, seed: int) -> Union[DataLoader, DataSpec]:
    """A DataLoader or DataSpec as it is; a map-style dataset in a DataLoader with Composer's seeded sampler.

    Args:
        data (Dataset | DataLoader | DataSpec): The data.
        name (str): What the data are called, for error messages (``'train_data'``).
        batch_size (int): Batch size, for a dataset.
        shuffle (bool): Whether to shuffle a dataset, reproducibly from ``seed`` and the epoch.
        seed (int): The sampler's seed.

    Returns:
        DataLoader | DataSpec: The data, ready for a ``Trainer``.

    Raises:
        TypeError: If ``data`` is none of these.
        ValueError: If the dataset is empty.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import TensorDataset
            from composer_kd.run.adapters import as_loader, first_batch

            loader = as_loader(TensorDataset(torch.zeros(10, 2)), 'train_data', batch_size=4, shuffle=True, seed=0)
            assert first_batch(loader, 'train_data')[0].shape == (4, 2)
    """
    if isinstance(data, (DataLoader, DataSpec)):
        return data
    is_dataset = hasattr(data, '__getitem__') and hasattr(data, '__len__')
    if not is_dataset or isinstance(data, (str, bytes, Mapping, torch.Tensor)):
        raise TypeError(
            f'{name} must be a map-style dataset (e.g. a torch Dataset), a DataLoader or a Composer DataSpec, '
            f'got {type(data).__name__}.'
        )
    if len(data) == 0:
        raise ValueError(f'{name} is empty.')
    return DataLoader(data, batch_size=batch_size, sampler=dist.get_sampler(data, shuffle=shuffle, seed=seed))


def first_batch(loader: Union[DataLoader, DataSpec], name: str) -> Any:
    """The first batch ``loader`` gives.

    Args:
        loader (DataLoader | DataSpec): The data.
        name (str): What the data are called, for the error message.

    Returns:
        Any: The batch.

    Raises:
        ValueError: If the loader gives no batch.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import DataLoader
            from composer_kd.run.adapters import first_batch

            assert first_batch(DataLoader(torch.arange(6), batch_size=4), 'data').tolist() == [0, 1, 2, 3]
    """
    dataloader = loader.dataloader if isinstance(loader, DataSpec) else loader
    for batch in dataloader:
        return batch
    raise ValueError(f'{name} gives no batch.')


def _to_device_of(module: nn.Module, batch: Any) -> Any:
    parameter = next(module.parameters(), None)
    if parameter is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(parameter.device)
    if isinstance(batch, Mapping):
        return {k: _to_device_of(module, v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device_of(module, v) for v in batch)
    return batch


def _probe(module: nn.Module, call) -> Any:
    """``call()`` with every module of ``module`` in eval mode and no gradient; the modes are given back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            return call()
    finally:
        for m, training in modes:
            m.training = training


def _plain_inputs(batch: Any, name: str) -> Any:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0]
    raise TypeError(
        f'{name}: a plain nn.Module is trained as a classifier on (inputs, targets) batches, but the data gives '
        f'batches of type {type(batch).__name__}; wrap the model in a ComposerModel (its own loss and metrics) '
        'for other batches.'
    )


def _class_count(output: Any, name: str) -> int:
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TypeError(
            f'{name}: a plain nn.Module must return class logits [batch, classes], got {shape}; wrap it in a '
            'ComposerModel (its own loss and metrics) to distil other outputs.'
        )
    return int(output.shape[-1])


def composer_student(student: Any, batch: Any, num_classes: Optional[int], multitask: bool) -> ComposerModel:
    """The student as a ComposerModel: as it is, in a HuggingFaceModel, or in a ComposerClassifier.

    A plain module is run once on ``batch``'s inputs (in eval mode, without gradient) to read its number of
    classes.

    Args:
        student (nn.Module): A ``ComposerModel``, a Hugging Face model or a plain classifier.
        batch (Any): A training batch; a plain classifier's is ``(inputs, targets)``.
        num_classes (int, optional): The classes expected of a plain or Hugging Face student. Default: any.
        multitask (bool): Whether the run distils several tasks (the student must then be a ``ComposerModel``).

    Returns:
        ComposerModel: The student itself, or a wrapper holding it (its weights are the student's).

    Raises:
        TypeError: If the student or the batch has a form that cannot be wrapped.
        ValueError: If its number of classes is not ``num_classes``.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.adapters import composer_student

            batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
            student = composer_student(torch.nn.Linear(4, 3), batch, num_classes=None, multitask=False)
            assert student.num_classes == 3
    """
    if isinstance(student, ComposerModel):
        return student
    if multitask:
        raise TypeError(
            'student: with tasks=, the student must be a ComposerModel with one output per task (e.g. '
            f'composer_kd.MultiTaskClassifier), got {type(student).__name__}.'
        )
    if is_hf_pretrained(student):
        labels = int(student.config.num_labels)
        if num_classes is not None and num_classes != labels:
            raise ValueError(f'num_classes={num_classes} but the Hugging Face student has num_labels={labels}.')
        return hugging_face_classifier(student, labels)
    if isinstance(student, nn.Module):
        inputs = _plain_inputs(batch, 'train_data')
        width = _class_count(_probe(student, lambda: student(_to_device_of(student, inputs))), 'student')
        if num_classes is not None and num_classes != width:
            raise ValueError(f'num_classes={num_classes} but the student returns {width} logits per example.')
        return classifier(student, width)
    raise TypeError(
        'student must be an nn.Module, a ComposerModel or a Hugging Face PreTrainedModel, '
        f'got {type(student).__name__}.'
    )


def evaluable_teacher(
    teacher: nn.Module,
    name: str,
    batch: Any,
    student_classes: Optional[int],
    task: Optional[str],
    key: Any,
    *,
    index: int = 0,
) -> Optional[nn.Module]:
    """A form of ``teacher`` a Trainer evaluates: itself when it is a ComposerModel, else a thin wrapper.

    The wrapper holds the teacher itself (no copy), so what is evaluated is exactly what taught. A plain
    module is run once on ``batch`` as ``Distillation`` will run it
    (:func:`~composer_kd.models.teachers.teacher_logits`) to read its number of classes, which must be the
    student's. ``None`` when its labels cannot be told apart in the batch (a plain module fed by ``input_key``
    from a batch that is not ``(inputs, targets)`` nor multi-task).

    Args:
        teacher (nn.Module): The teacher.
        name (str): What it is called, for error messages (``'teacher 0'``).
        batch (Any): A training batch.
        student_classes (int, optional): The student's number of classes, which a plain teacher must have.
        task (str, optional): The task it teaches, in a multi-task run: it is wrapped as that task's head.
        key (Any): ``Distillation``'s ``input_key``: what of the batch the teacher reads. ``None``: the inputs.
        index (int, optional): Its position among the teachers ``Distillation`` is given, which the error of a
            failing forward pass names (``teachers[0]``). Default: ``0``.

    Returns:
        nn.Module | None: The teacher itself, a wrapper holding it, or ``None``.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.adapters import evaluable_teacher

            batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
            wrapped = evaluable_teacher(torch.nn.Linear(4, 3), 'teacher 0', batch, 3, task=None, key=None)
            assert wrapped.num_classes == 3
    """
    if isinstance(teacher, ComposerModel):
        return teacher
    if is_hf_pretrained(teacher):
        return hugging_face_classifier(teacher, int(teacher.config.num_labels))
    inputs = _to_device_of(teacher, batch)
    logits = _probe(teacher, lambda: teacher_logits([teacher], inputs, input_key=key, teacher_indices=[index]))
    width = _class_count(logits, name)
    if task is not None:
        return MultiTaskClassifier(nn.Identity(), {task: teacher}, num_classes={task: width})
    if student_classes is not None and width != student_classes:
        raise ValueError(
            f'{name} returns {width} logits per example but the student {student_classes}: they must share one '
            'label set.'
        )
    pair = isinstance(batch, (list, tuple)) and len(batch) == 2
    return classifier(teacher, width) if pair and key is None else None


def eval_loaders(eval_data: Any, batch_size: int, seed: int) -> dict[str, Union[DataLoader, DataSpec]]:
    """``{split: loader}``: ``eval_data``'s splits, or its one split named ``'eval'``; empty for ``None``.

    Args:
        eval_data (Any): Evaluation data (see :func:`as_loader`), ``{split: data}``, or ``None``.
        batch_size (int): Batch size, for datasets.
        seed (int): The samplers' seed.

    Returns:
        dict[str, DataLoader | DataSpec]: The loaders by split name, in order.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import TensorDataset
            from composer_kd.run.adapters import eval_loaders

            data = TensorDataset(torch.zeros(10, 2))
            assert list(eval_loaders({'val': data, 'test': data}, batch_size=5, seed=0)) == ['val', 'test']
            assert list(eval_loaders(data, batch_size=5, seed=0)) == ['eval']
    """
    if eval_data is None:
        return {}
    if isinstance(eval_data, Mapping):
        if not eval_data or not all(isinstance(k, str) for k in eval_data):
            raise TypeError('eval_data: a mapping must be {split name: data}, with at least one split.')
        return {
            split: as_loader(data, f'eval_data[{split!r}]', batch_size, shuffle=False, seed=seed)
            for split, data in eval_data.items()
        }
    return {'eval': as_loader(eval_data, 'eval_data', batch_size, shuffle=False, seed=seed)}
