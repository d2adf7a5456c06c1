"""Finding random augmentation in the training data, which would make recorded teacher outputs wrong.

A teacher cache pairs each example with the teacher's output for the input seen the first time. A random transform
on the dataset, or a Composer algorithm that changes the batch before the forward pass, presents other inputs in
later epochs; :func:`find_augmentation` names the first such source so that the cache can refuse to run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from composer.core import Event, State
from torch import nn

__all__ = ['find_augmentation', 'refuse_augmentation']

# Transforms that draw random numbers (torchvision v1 and v2, and Composer's own) besides every 'Random*' class.
_RANDOM_TRANSFORMS = frozenset(
    {
        'AugMix',
        'AugmentAndMixTransform',
        'AutoAugment',
        'ColOutTransform',
        'ColorJitter',
        'CutMix',
        'ElasticTransform',
        'GaussianBlur',
        'GaussianNoise',
        'JPEG',
        'MixUp',
        'RandAugment',
        'RandAugmentTransform',
        'ScaleJitter',
        'TrivialAugmentWide',
    }
)
# Composer algorithms that change the inputs before the forward pass; others are found by the events they match.
_INPUT_CHANGING_ALGORITHMS = frozenset(
    {
        'AugMix',
        'ColOut',
        'CutMix',
        'CutOut',
        'MixUp',
        'ProgressiveResizing',
        'RandAugment',
        'SelectiveBackprop',
        'SeqLengthWarmup',
    }
)
_INPUT_EVENTS = (Event.AFTER_DATALOADER, Event.BEFORE_FORWARD)


def _is_random_transform(obj: Any) -> bool:
    name = type(obj).__name__
    return name.startswith('Random') or name in _RANDOM_TRANSFORMS


def _find_random_transform(obj: Any, where: str, seen: set[int]) -> Optional[str]:
    if obj is None or isinstance(obj, (str, bytes, int, float, torch.Tensor)) or id(obj) in seen:
        return None
    seen.add(id(obj))
    if _is_random_transform(obj):
        return f'{type(obj).__name__} (at {where})'
    if isinstance(obj, (list, tuple)):
        children = [(f'{where}[{i}]', child) for i, child in enumerate(obj)]
    else:
        # Compose / RandomApply / nn.Sequential hold 'transforms'; torchvision's StandardTransform a 'transform'.
        children = [
            (f'{where}.{attr}', getattr(obj, attr)) for attr in ('transforms', 'transform') if hasattr(obj, attr)
        ]
        if isinstance(obj, nn.Module) and not children:
            children = [(f'{where}.{name}', child) for name, child in obj.named_children()]
    for child_where, child in children:
        found = _find_random_transform(child, child_where, seen)
        if found:
            return found
    return None


def _find_in_dataset(dataset: Any, where: str, seen: set[int]) -> Optional[str]:
    if dataset is None or id(dataset) in seen:
        return None
    seen.add(id(dataset))
    for attr in ('transform', 'transforms'):
        found = _find_random_transform(getattr(dataset, attr, None), f'{where}.{attr}', seen)
        if found:
            return found
    inner = getattr(dataset, 'dataset', None)  # IndexedDataset, Subset, ...
    if inner is not None:
        found = _find_in_dataset(inner, f'{where}.dataset', seen)
        if found:
            return found
    for i, part in enumerate(getattr(dataset, 'datasets', None) or ()):  # ConcatDataset
        found = _find_in_dataset(part, f'{where}.datasets[{i}]', seen)
        if found:
            return found
    return None


def _changes_inputs(algorithm: Any, state: Optional[State]) -> bool:
    if type(algorithm).__name__ in _INPUT_CHANGING_ALGORITHMS:
        return True
    if state is None:
        return False
    for event in _INPUT_EVENTS:
        try:
            if algorithm.match(event, state):
                return True
        except Exception:  # noqa: BLE001 - a match that needs more state than FIT_START has says nothing here
            continue
    return False


def find_augmentation(dataset: Any, algorithms: Sequence[Any] = (), state: Optional[State] = None) -> Optional[str]:
    """Describe the first source of random augmentation found in the training data, or ``None``.

    Looked for: torchvision (v1 or v2) random transforms, and Composer's, in ``dataset.transform`` /
    ``dataset.transforms`` (through ``Compose``, ``RandomApply``, ``nn.Sequential``, and datasets wrapped in
    ``IndexedDataset``, ``Subset`` or ``ConcatDataset``): every class named ``Random*`` and ``ColorJitter``,
    ``GaussianBlur``, ``GaussianNoise``, ``ElasticTransform``, ``AutoAugment``, ``RandAugment``,
    ``TrivialAugmentWide``, ``AugMix``, ``JPEG``, ``ScaleJitter``, ``MixUp``, ``CutMix``; and Composer
    algorithms that change the batch before the forward pass: MixUp, CutMix, CutOut, RandAugment, AugMix, ColOut,
    ProgressiveResizing, SeqLengthWarmup, SelectiveBackprop, and any algorithm matching ``Event.AFTER_DATALOADER``
    or ``Event.BEFORE_FORWARD``. Algorithms that only change the targets (e.g. ``LabelSmoothing``) leave the
    teacher's input, and so its output, as it was.

    Args:
        dataset: The training dataset.
        algorithms (Sequence): The trainer's other algorithms.
        state (State, optional): The trainer's state, to ask each algorithm which events it matches.

    Returns:
        str | None: e.g. ``'RandomHorizontalFlip (at train_dataloader.dataset.transform.transforms[0])'``.

    Example:
        .. testcode::

            import torchvision.transforms as T
            from composer_kd.cache import find_augmentation

            class Images(list):
                transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor()])

            assert find_augmentation(Images()).startswith('RandomHorizontalFlip')
    """
    found = _find_in_dataset(dataset, 'train_dataloader.dataset', set())
    if found:
        return found
    for algorithm in algorithms:
        if _changes_inputs(algorithm, state):
            return f'Composer algorithm {type(algorithm).__name__} (it changes the batch before the forward pass)'
    return None


def refuse_augmentation(dataset: Any, algorithms: Sequence[Any] = (), state: Optional[State] = None) -> None:
    """Refuse randomly augmented training data for a teacher cache, naming what :func:`find_augmentation` found.

    Args:
        dataset: The training dataset.
        algorithms (Sequence): The trainer's other algorithms.
        state (State, optional): The trainer's state, to ask each algorithm which events it matches.

    Raises:
        ValueError: If :func:`find_augmentation` finds a source of random augmentation.

    Example:
        .. testcode::

            import torchvision.transforms as T
            from composer_kd.cache.augmentation import refuse_augmentation

            class Images(list):
                transform = T.RandomCrop(4)

            refuse_augmentation([1, 2])  # nothing random: nothing raised
            try:
                refuse_augmentation(Images())
            except ValueError as error:
                assert 'RandomCrop (at train_dataloader.dataset.transform)' in str(error)
            else:
                raise AssertionError('not refused')
    """
    found = find_augmentation(dataset, algorithms, state)
    if found:
        raise ValueError(
            f'teacher_cache cannot be used with randomly augmented training data: {found}. Recorded teacher '
            'outputs belong to the inputs seen the first time; later epochs would pair other inputs with them. '
            'Remove the augmentation, or pass TeacherCache(allow_augmentation=True) to distil from the '
            "first epoch's outputs anyway."
        )
