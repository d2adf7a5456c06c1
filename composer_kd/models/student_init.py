"""Building a smaller Hugging Face student from its teacher's own layers (DistilBERT-style initialization)."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from composer.models import HuggingFaceModel
from torch import nn

__all__ = ['student_from_teacher_layers']

# Config attributes that hold the number of transformer blocks, by model family.
_LAYER_COUNT_ATTRIBUTES = ('num_hidden_layers', 'n_layer', 'num_layers')


def _layer_count_attribute(config) -> str:
    for name in _LAYER_COUNT_ATTRIBUTES:
        if isinstance(getattr(config, name, None), int):
            return name
    raise ValueError(f'{type(config).__name__} names no layer count ({", ".join(_LAYER_COUNT_ATTRIBUTES)}).')


def _block_list_path(model: nn.Module, n_layers: int) -> str:
    """The dotted path of the ``nn.ModuleList`` holding the model's ``n_layers`` transformer blocks."""
    candidates = [
        name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    if len(candidates) != 1:
        raise ValueError(
            f'Cannot tell which module list of {type(model).__name__} holds its {n_layers} layers: {candidates}.'
        )
    return candidates[0]


def student_from_teacher_layers(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of a Hugging Face ``teacher`` keeping only the transformer blocks at ``layers``.

    Everything else (embeddings, final norms, heads) is copied as is, and block ``layers[j]`` of the teacher
    becomes block ``j`` of the student. Starting from the teacher's own weights, as DistilBERT did with every
    other layer, gives a student that distils faster and better than one initialized at random. The teacher is
    not modified.

    Args:
        teacher (nn.Module): A Hugging Face ``PreTrainedModel`` (BERT, GPT-2, Llama and alike), or Composer's
            ``HuggingFaceModel`` around one.
        layers (Sequence[int]): Indices of the teacher's blocks to keep, in the order the student uses them.

    Returns:
        nn.Module: The student, a model of the teacher's class with ``len(layers)`` blocks.

    Raises:
        ValueError: If ``layers`` is empty or an index is out of range.

    Example:
        .. testcode::

            from transformers import BertConfig, BertForSequenceClassification
            from composer_kd.models.student_init import student_from_teacher_layers

            config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=32)
            student = student_from_teacher_layers(BertForSequenceClassification(config), layers=[0, 2])
            assert student.config.num_hidden_layers == 2
    """
    if isinstance(teacher, HuggingFaceModel):
        teacher = teacher.model
    attribute = _layer_count_attribute(teacher.config)
    n_layers = getattr(teacher.config, attribute)
    layers = list(layers)
    if not layers:
        raise ValueError('layers: keep at least one of the teacher layers.')
    bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < n_layers)]
    if bad:
        raise ValueError(f'layers {bad} are out of range: the teacher has layers 0..{n_layers - 1}.')

    config = copy.deepcopy(teacher.config)
    setattr(config, attribute, len(layers))
    student = type(teacher)(config)

    blocks = re.escape(_block_list_path(teacher, n_layers))
    block_key = re.compile(rf'^({blocks})\.(\d+)\.(.*)$')
    teacher_weights = teacher.state_dict()
    student_weights = {}
    for key in student.state_dict():
        match = block_key.match(key)
        source = f'{match[1]}.{layers[int(match[2])]}.{match[3]}' if match else key
        student_weights[key] = teacher_weights[source].clone()
    student.load_state_dict(student_weights)
    return student
