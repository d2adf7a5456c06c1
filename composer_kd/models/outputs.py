"""Reading logits out of model outputs, feeding a teacher the student's batch, and finding valid tokens."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer.models import ComposerModel, HuggingFaceModel
from composer.utils import batch_get
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    'Key',
    'describe_batch',
    'extract_logits',
    'is_causal_lm',
    'logits_are_usable',
    'padding_mask',
    'poisoned_rows',
    'run_teacher',
    'target_labels',
    'token_mask',
]

#: How a part of a batch or an output is chosen, as Composer's ``batch_get`` takes it: an index, a key, an
#: attribute name, or a callable receiving the whole object.
Key = Union[int, str, Callable[[Any], Any]]

# Batch entries a Hugging Face teacher must not receive: with them it would compute its own loss, which
# distillation never uses.
_HF_NON_INPUTS = frozenset({'labels', 'label', 'return_loss'})


def extract_logits(output: Any, key: Optional[Key] = None, *, role: str = 'student') -> torch.Tensor:
    """Return the logits held in a model's output.

    Without ``key``: a tensor is the logits; a mapping or Hugging Face ``ModelOutput`` gives its ``'logits'``
    entry; a tuple or list gives its first element.

    Args:
        output (Any): What a model's forward pass returned.
        key (int | str | Callable, optional): Chooses the logits instead, as ``composer.utils.batch_get`` does.
        role (str, optional): ``'student'`` or ``'teacher'``; names the argument to pass in error messages.

    Returns:
        torch.Tensor: The logits.

    Raises:
        TypeError: If no logits tensor can be read from ``output``.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import extract_logits

            logits = extract_logits({'logits': torch.zeros(2, 3), 'hidden': torch.ones(2, 4)})
            assert logits.shape == (2, 3)
    """
    if key is not None:
        logits = batch_get(output, key)
    elif isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, Mapping):
        logits = output.get('logits')
    elif isinstance(output, Sequence) and not isinstance(output, str) and len(output) > 0:
        logits = output[0]
    else:
        logits = None
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f'Cannot read the {role} logits from an output of type {type(output).__name__}: expected a tensor, '
            f"a mapping with 'logits', or a tuple whose first element is the logits. Pass "
            f'`{role}_logits_key=` (an index, a key, or a callable taking the output) to choose them.'
        )
    return logits


def poisoned_rows(logits: torch.Tensor) -> torch.Tensor:
    """Which examples' logits hold NaN or +inf, the values that would poison a student's gradients.

    ``-inf`` is a legitimate "impossible class" and does not count. One max-reduction per example (which
    propagates NaN), so no logits-sized temporary is made, however large the vocabulary. A teacher cache uses it to
    leave such examples unrecorded; :func:`logits_are_usable` gives the one flag a whole microbatch needs.

    Args:
        logits (torch.Tensor): Logits with examples along the first dimension.

    Returns:
        torch.Tensor: A bool tensor with one entry per example, on the logits' device.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import poisoned_rows

            inf, nan = float('inf'), float('nan')
            logits = torch.tensor([[0.0, -inf], [nan, 1.0], [inf, 0.0]])
            assert poisoned_rows(logits).tolist() == [False, True, True]
    """
    if logits.numel() == 0:
        return torch.zeros(logits.shape[0] if logits.dim() else 1, dtype=torch.bool, device=logits.device)
    largest = logits.amax(dim=tuple(range(1, logits.dim()))) if logits.dim() > 1 else logits.reshape(-1)
    return ~(largest < float('inf'))


def logits_are_usable(logits: torch.Tensor) -> torch.Tensor:
    """Whether no entry of ``logits`` is NaN or +inf (``-inf``, an "impossible class", is fine).

    One reduction and one comparison, left on the logits' device so that asking never waits for it: the flag is
    computed for every distilled microbatch and read once per batch.

    Args:
        logits (torch.Tensor): Logits of any shape.

    Returns:
        torch.Tensor: A 0-dimensional bool tensor on the logits' device.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import logits_are_usable

            assert logits_are_usable(torch.tensor([0.0, -float('inf')]))
            assert not logits_are_usable(torch.tensor([0.0, float('nan')]))
    """
    if logits.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=logits.device)
    return logits.amax() < float('inf')  # amax propagates NaN, and NaN < inf is false


def _forward_argument_names(model: nn.Module) -> Optional[frozenset[str]]:
    """Names ``model.forward`` accepts, or ``None`` when it takes ``**kwargs`` (anything goes)."""
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def _is_hf_pretrained(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _call_with_mapping(model: nn.Module, batch: Mapping) -> Any:
    accepted = _forward_argument_names(model)
    kwargs = {k: v for k, v in batch.items() if k not in _HF_NON_INPUTS and (accepted is None or k in accepted)}
    return model(**kwargs)


def run_teacher(teacher: nn.Module, batch: Any, input_key: Optional[Key] = None) -> Any:
    """Run ``teacher`` on the batch the student trained on, the way a model of its kind is called.

    With ``input_key`` the chosen part of the batch is the input: a mapping is passed as keyword arguments,
    anything else as the single positional argument. Otherwise:

    * a Composer ``HuggingFaceModel`` or a Hugging Face ``PreTrainedModel`` gets the batch's entries that its
      ``forward`` accepts, less the labels (the teacher's own loss is never needed);
    * any other ``ComposerModel`` gets the whole batch, as the trainer gives it to the student;
    * a plain ``nn.Module`` gets a tensor batch as it is, or the first element of a tuple/list batch.

    The batch itself is never modified.

    Args:
        teacher (nn.Module): The teacher.
        batch (Any): The (micro)batch.
        input_key (int | str | Callable, optional): Chooses the teacher's input from the batch.

    Returns:
        Any: The teacher's output.

    Raises:
        TypeError: If the batch's form gives no input for a plain module and no ``input_key`` was given.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import run_teacher

            teacher = torch.nn.Linear(4, 3)
            output = run_teacher(teacher, (torch.randn(2, 4), torch.tensor([0, 1])))
            assert output.shape == (2, 3)
    """
    if input_key is not None:
        inputs = batch_get(batch, input_key)
        return teacher(**inputs) if isinstance(inputs, Mapping) else teacher(inputs)
    if isinstance(teacher, HuggingFaceModel) and isinstance(batch, Mapping):
        return _call_with_mapping(teacher.model, batch)
    if isinstance(teacher, ComposerModel):
        return teacher(batch)
    if isinstance(batch, Mapping) and _is_hf_pretrained(teacher):
        return _call_with_mapping(teacher, batch)
    if isinstance(batch, torch.Tensor):
        return teacher(batch)
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        return teacher(batch[0])
    raise TypeError(
        f'Cannot tell which part of a {type(batch).__name__} batch a teacher of type {type(teacher).__name__} '
        'takes. Pass `input_key=` (an index, a key, or a callable taking the batch) to choose it.'
    )


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face decoder-only language model (its logits at ``i`` predict token ``i+1``).

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import is_causal_lm

            assert not is_causal_lm(torch.nn.Linear(2, 2))
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, HuggingFaceModel):
        model = model.model
    if not _is_hf_pretrained(model):
        return False
    return bool(model.can_generate()) and not getattr(model.config, 'is_encoder_decoder', False)


def padding_mask(batch: Any, positions: tuple[int, ...]) -> Optional[torch.Tensor]:
    """``attention_mask != 0`` when the batch has an attention mask of shape ``positions``, else ``None``.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import padding_mask

            batch = {'attention_mask': torch.tensor([[1, 1, 0]])}
            assert padding_mask(batch, (1, 3)).tolist() == [[True, True, False]]
            assert padding_mask(batch, (1, 3, 8)) is None
    """
    if not isinstance(batch, Mapping):
        return None
    attention_mask = batch.get('attention_mask')
    if isinstance(attention_mask, torch.Tensor) and tuple(attention_mask.shape) == tuple(positions):
        return attention_mask != 0
    return None


def token_mask(batch: Any, logits: torch.Tensor, causal: bool = False) -> Optional[torch.Tensor]:
    """Positions of token-level logits ``[batch, seq, classes]`` that count in the distillation loss.

    A position is excluded where the batch's ``attention_mask`` is 0 (padding) or its ``labels`` are ``-100``
    (ignored), when those entries have the logits' ``[batch, seq]`` shape.

    For a causal language model (``causal=True``) the logits at position ``i`` predict token ``i + 1``, as
    Hugging Face models shift their labels internally: position ``i`` counts where token ``i + 1`` is a real,
    non-ignored token (and ``i`` itself is not padding), and the last position, which predicts nothing in the
    batch, never counts.

    Args:
        batch (Any): The (micro)batch.
        logits (torch.Tensor): The student's logits.
        causal (bool, optional): Apply the one-token shift of causal language models. Default: ``False``.

    Returns:
        torch.Tensor | None: A boolean ``[batch, seq]`` tensor, or ``None`` when every position counts.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import token_mask

            batch = {'attention_mask': torch.tensor([[1, 1, 0]]), 'labels': torch.tensor([[-100, 5, 7]])}
            assert token_mask(batch, torch.zeros(1, 3, 10)).tolist() == [[False, True, False]]
            # Causal: position 0 predicts token 1 (label 5); position 1 would predict padding.
            assert token_mask(batch, torch.zeros(1, 3, 10), causal=True).tolist() == [[True, False, False]]
    """
    if logits.ndim < 3 or not isinstance(batch, Mapping):
        return None
    positions = logits.shape[:-1]

    def entry(name: str) -> Optional[torch.Tensor]:
        value = batch.get(name)
        if isinstance(value, torch.Tensor) and value.shape == positions:
            return value.to(device=logits.device)
        return None

    attention_mask, labels = entry('attention_mask'), entry('labels')
    present = attention_mask != 0 if attention_mask is not None else None
    target_ok = labels != -100 if labels is not None else None
    if causal:
        # What position i predicts is token i+1: judge it by token i+1's entries; nothing follows the last.
        def shifted(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if valid is None:
                return None
            return torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)

        next_present, target_ok = shifted(present), shifted(target_ok)
        if present is not None:
            present = present & next_present
        elif target_ok is None:
            target_ok = shifted(torch.ones(positions, dtype=torch.bool, device=logits.device))
    if present is None:
        return target_ok
    return present if target_ok is None else present & target_ok


def target_labels(
    batch: Any, logits: torch.Tensor, causal: bool = False, key: Optional[Key] = None
) -> Optional[torch.Tensor]:
    """The target class of every position of ``logits``, read from the batch, for losses that need it.

    A loss that takes a ``labels`` argument (such as :class:`~composer_kd.DecoupledKD`) receives these from
    ``Distillation``. They are, in this order: a dict batch's entry ``batch[key]`` when ``key`` is a string it
    holds (a multi-task batch ``{'inputs': x, task: labels}``, with the task's name as ``student_logits_key``);
    its ``'labels'`` entry; the targets of an ``(inputs, targets)`` batch. They are kept only if they are an
    integer tensor of the logits' shape without the class dimension (soft or one-hot targets are not), and moved
    to the logits' device. For a causal language model (``causal=True``) position ``i`` predicts token ``i + 1``,
    so its target is the label of ``i + 1``, and the last position gets ``-100`` (no target).

    Args:
        batch (Any): The (micro)batch.
        logits (torch.Tensor): The student's logits ``[..., classes]``.
        causal (bool, optional): Apply the one-token shift of causal language models. Default: ``False``.
        key (int | str | Callable, optional): The student's logits key; a string names the labels' entry in
            dict batches. Default: ``None``.

    Returns:
        torch.Tensor | None: Integer class indices, ``-100`` where there is no target; ``None`` if the batch has
        no such labels.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import target_labels

            assert target_labels((torch.zeros(2, 4), torch.tensor([3, 1])), torch.zeros(2, 5)).tolist() == [3, 1]
            batch = {'input_ids': torch.zeros(1, 3, dtype=torch.long), 'labels': torch.tensor([[-100, 5, 7]])}
            assert target_labels(batch, torch.zeros(1, 3, 10), causal=True).tolist() == [[5, 7, -100]]
            assert target_labels((torch.zeros(2, 4), torch.rand(2, 5)), torch.zeros(2, 5)) is None  # soft targets
    """
    labels = None
    if isinstance(batch, Mapping):
        if isinstance(key, str) and key in batch:
            labels = batch[key]
        else:
            labels = batch.get('labels')
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 2:
        labels = batch[1]
    positions = logits.shape[:-1]
    usable = (
        isinstance(labels, torch.Tensor)
        and not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
        and labels.shape == positions
    )
    if not usable:
        return None
    labels = labels.to(device=logits.device)
    if causal and labels.ndim >= 2:
        # What position i predicts is token i+1; nothing follows the last.
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return labels


def describe_batch(batch: Any, depth: int = 0) -> str:
    """A short description of a batch's structure for error messages: tensor shapes and dtypes, keys, types.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.outputs import describe_batch

            text = describe_batch((torch.zeros(8, 20), {'labels': torch.zeros(8, dtype=torch.long)}))
            assert text == "(Tensor[8, 20] float32, {'labels': Tensor[8] int64})"
    """
    if isinstance(batch, torch.Tensor):
        return f'Tensor{list(batch.shape)} {str(batch.dtype).removeprefix("torch.")}'
    if depth >= 3:
        return type(batch).__name__
    if isinstance(batch, Mapping):
        return '{' + ', '.join(f'{k!r}: {describe_batch(v, depth + 1)}' for k, v in list(batch.items())[:8]) + '}'
    if isinstance(batch, (list, tuple)):
        inner = ', '.join(describe_batch(v, depth + 1) for v in batch[:8])
        return f'({inner})' if isinstance(batch, tuple) else f'[{inner}]'
    return type(batch).__name__
