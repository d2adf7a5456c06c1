"""Building the models a recipe names, as Composer models, without downloading anything.

Image models are wrapped in ``ComposerClassifier`` and text models in Composer's ``HuggingFaceModel``, so the
same object is trained by a Composer ``Trainer``, evaluated, and handed to ``Distillation`` as a teacher.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from composer.models import ComposerModel
from torch import nn

from composer_kd.losses import cross_entropy_with_hidden_labels
from composer_kd.models.teachers import load_teacher_checkpoint
from composer_kd.multitask import MultiTaskClassifier
from composer_kd.recipes.loader import RecipeError
from composer_kd.recipes.schema import ModelSpec, Recipe
from composer_kd.run.adapters import classifier, hugging_face_classifier
from composer_kd.run.reporting import count_parameters

# classifier, hugging_face_classifier (composer_kd.run.adapters), count_parameters (composer_kd.run.reporting) and
# cross_entropy_with_hidden_labels (composer_kd.losses) are importable from here as before.
__all__ = [
    'MODEL_KINDS',
    'TaskInfo',
    'build_model',
    'causal_lm',
    'check_model_takes',
    'classifier',
    'count_parameters',
    'cross_entropy_with_hidden_labels',
    'find_pretrained',
    'has_uri_scheme',
    'hugging_face_classifier',
    'input_hint',
]

#: The model kinds a recipe may name, and what each needs.
MODEL_KINDS: dict[str, str] = {
    'mlp': 'a multilayer perceptron (hidden: [widths])',
    'cnn': 'a small convolutional network (channels: [...], hidden: [...])',
    'torchvision': 'a torchvision constructor by name, randomly initialized (name: resnet18)',
    'hf_config': 'a Hugging Face sequence classifier from a config, randomly initialized (name: bert)',
    'huggingface': 'a pretrained Hugging Face model on disk (name: a local directory or a cached Hub id)',
}

#: Kinds that take images, and kinds that take token ids.
IMAGE_KINDS = ('mlp', 'cnn', 'torchvision')
TEXT_KINDS = ('hf_config', 'huggingface')
#: Kinds that get one head per task on multi-task data.
MULTITASK_KINDS = ('mlp', 'cnn')


@dataclass(frozen=True)
class TaskInfo:
    """What a dataset tells the models built for it.

    Attributes:
        modality (str): ``'image'``, ``'text'`` (token ids to classify) or ``'lm'`` (token sequences for causal
            language models).
        num_classes (int): Number of classes (for ``'lm'``: the vocabulary's size, or 0 if the data do not say).
        input_shape (tuple[int, ...]): One image's shape ``(C, H, W)``; for text ``(seq_len,)``.
        vocab_size (int, optional): For synthetic text and token sequences: the size of their vocabulary.
        tasks (dict[str, int]): For multi-task data: the classes of each task; empty for one task.
    """

    modality: str
    num_classes: int
    input_shape: tuple[int, ...]
    vocab_size: Optional[int] = None
    tasks: dict[str, int] = field(default_factory=dict)


def has_uri_scheme(path: str) -> bool:
    """Whether ``path`` is a URI (``s3://...``) that Composer's ``get_file`` reads, rather than a local path."""
    return '://' in path


def find_pretrained(name: str) -> tuple[Optional[str], list[str]]:
    """Find a Hugging Face model or tokenizer on this machine, never downloading.

    Args:
        name (str): A local directory, or a Hub id such as ``google/bert_uncased_L-6_H-768_A-12``.

    Returns:
        tuple[str | None, list[str]]: The directory found (or ``None``) and every place looked at, for messages.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    local = os.path.abspath(os.path.expanduser(name))
    looked = [f'the local directory {local}']
    if os.path.isdir(local):
        return local, looked
    if name.count('/') == 1 and not name.startswith(('.', '/', '~')):
        cache_entry = os.path.join(HF_HUB_CACHE, 'models--' + name.replace('/', '--'))
        looked.append(f'the Hugging Face cache {cache_entry}')
        try:
            return snapshot_download(name, cache_dir=HF_HUB_CACHE, local_files_only=True), looked
        except Exception:  # not cached (or a broken cache entry): either way, not usable offline
            pass
    return None, looked


def _mlp(in_features: int, hidden: list[int], num_classes: int, dropout: float) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(input_shape: tuple[int, ...], channels: list[int], hidden: list[int], num_classes: int, dropout: float):
    if len(input_shape) != 3:
        raise ValueError(f'kind cnn needs images (C, H, W), but the dataset gives inputs of shape {input_shape}.')
    layers: list[nn.Module] = []
    width = input_shape[0]
    for c in channels or [32]:
        layers += [nn.Conv2d(width, c, kernel_size=3, padding=1), nn.ReLU()]
        width = c
    layers += [nn.MaxPool2d(2), nn.Flatten()]
    return nn.Sequential(
        *layers, _mlp(width * (input_shape[1] // 2) * (input_shape[2] // 2), hidden, num_classes, dropout)
    )


def _multitask(spec: ModelSpec, task: TaskInfo) -> MultiTaskClassifier:
    """The layers of an ``mlp`` or ``cnn`` as a shared trunk, and a linear head for each of its tasks."""
    layers: list[nn.Module] = []
    if spec.kind == 'cnn':
        width = task.input_shape[0]
        for c in list(spec.channels) or [32]:
            layers += [nn.Conv2d(width, c, kernel_size=3, padding=1), nn.ReLU()]
            width = c
        layers.append(nn.MaxPool2d(2))
        width *= (task.input_shape[1] // 2) * (task.input_shape[2] // 2)
    else:
        width = math.prod(task.input_shape)
    layers.append(nn.Flatten())
    for h in spec.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = h
    tasks = list(spec.tasks) or list(task.tasks)
    return MultiTaskClassifier(nn.Sequential(*layers), {t: nn.Linear(width, task.tasks[t]) for t in tasks})


def _untrained_head(spec: ModelSpec, directory: str, missing: list[str], key: str) -> RecipeError:
    shown = ', '.join(missing[:4]) + (f' and {len(missing) - 4} more' if len(missing) > 4 else '')
    return RecipeError(
        'recipe',
        [
            f'{key}.name: teacher {key.rsplit(".", 1)[-1]} would distil from a random head: the Hugging Face model '
            f'at {directory} has no weights for its sequence-classification head ({shown} would be newly '
            f'initialized; it holds a bare encoder, or a model for another task). Add {key}.train (e.g. '
            f'{key}.train.max_duration=3ep) to fine-tune it first, give {key}.checkpoint (a fine-tuned '
            f'checkpoint), or point {key}.name at a model fine-tuned for this task'
        ],
    )


def causal_lm(hf_model: nn.Module) -> ComposerModel:
    """A Hugging Face causal language model as a Composer model scored by loss and perplexity.

    The batch's ``labels`` are its ``input_ids`` (padding labelled -100): the model predicts each next token.
    ``LanguageCrossEntropy`` (nats per token) comes first, so it is the headline metric of a run's summary.
    """
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from composer.models import HuggingFaceModel

    return HuggingFaceModel(
        hf_model, metrics=[LanguageCrossEntropy(), LanguagePerplexity()], use_logits=True, shift_labels=True
    )


def _causal_lm_from_spec(spec: ModelSpec, task: TaskInfo) -> ComposerModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.kind == 'hf_config':
        options = dict(spec.kwargs)
        if task.vocab_size is not None:
            options.setdefault('vocab_size', task.vocab_size)
        config = AutoConfig.for_model(str(spec.name), **options)
        return causal_lm(AutoModelForCausalLM.from_config(config))
    directory, _ = find_pretrained(str(spec.name))
    if directory is None:
        raise FileNotFoundError(f'Hugging Face model {spec.name!r} is not on this machine.')
    return causal_lm(AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **dict(spec.kwargs)))


def build_model(spec: ModelSpec, task: TaskInfo, teacher_key: Optional[str] = None) -> ComposerModel:
    """Build the model ``spec`` describes for ``task``, loading ``spec.checkpoint`` if given.

    Assumes the recipe passed :func:`composer_kd.recipes.validate.check_recipe` (names and files exist).

    Args:
        spec (ModelSpec): The model's section of the recipe.
        task (TaskInfo): The dataset's classes and input shape.
        teacher_key (str, optional): For a teacher, its recipe key (``'teachers.0'``): a ``huggingface`` teacher
            that neither ``train:`` fine-tunes nor ``checkpoint:`` loads must then hold trained weights for every
            layer, its task head included. Default: ``None``, a model that is trained here (a student).

    Returns:
        ComposerModel: A ``ComposerClassifier`` (image kinds) or ``HuggingFaceModel`` (text kinds).

    Raises:
        RecipeError: For a teacher whose task head would be newly initialized, naming the keys to add.
    """
    if task.modality == 'lm' and spec.kind in TEXT_KINDS:
        model: ComposerModel = _causal_lm_from_spec(spec, task)
    elif task.tasks and spec.kind in MULTITASK_KINDS:
        model = _multitask(spec, task)
    elif spec.kind == 'mlp':
        model = classifier(
            _mlp(math.prod(task.input_shape), list(spec.hidden), task.num_classes, spec.dropout), task.num_classes
        )
    elif spec.kind == 'cnn':
        module = _cnn(task.input_shape, list(spec.channels), list(spec.hidden), task.num_classes, spec.dropout)
        model = classifier(module, task.num_classes)
    elif spec.kind == 'torchvision':
        import torchvision

        constructor = getattr(torchvision.models, str(spec.name))
        # weights=None always: pretrained torchvision weights would be downloaded. Load a checkpoint instead.
        module = constructor(weights=None, num_classes=task.num_classes, **dict(spec.kwargs))
        model = classifier(module, task.num_classes)
    elif spec.kind == 'hf_config':
        from transformers import AutoConfig, AutoModelForSequenceClassification

        options = dict(spec.kwargs)
        if task.vocab_size is not None:
            options.setdefault('vocab_size', task.vocab_size)
        options.setdefault('max_position_embeddings', max(512, task.input_shape[0]))
        config = AutoConfig.for_model(str(spec.name), num_labels=task.num_classes, **options)
        model = hugging_face_classifier(AutoModelForSequenceClassification.from_config(config), task.num_classes)
    elif spec.kind == 'huggingface':
        from transformers import AutoModelForSequenceClassification

        directory, _ = find_pretrained(str(spec.name))
        if directory is None:
            raise FileNotFoundError(f'Hugging Face model {spec.name!r} is not on this machine.')
        hf_model, loading = AutoModelForSequenceClassification.from_pretrained(
            directory,
            num_labels=task.num_classes,
            local_files_only=True,
            output_loading_info=True,
            **dict(spec.kwargs),
        )
        untaught = teacher_key is not None and getattr(spec, 'train', None) is None and not spec.checkpoint
        if untaught and loading['missing_keys']:
            raise _untrained_head(spec, directory, sorted(loading['missing_keys']), teacher_key)
        model = hugging_face_classifier(hf_model, task.num_classes)
    else:
        raise ValueError(f'Unknown model kind {spec.kind!r}; known: {", ".join(MODEL_KINDS)}.')
    if spec.checkpoint:
        load_teacher_checkpoint(model, spec.checkpoint)
    return model


def _describe_batch(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f'{list(batch.shape)} {str(batch.dtype).removeprefix("torch.")}'
    if isinstance(batch, dict):
        return '{' + ', '.join(f'{k}: {_describe_batch(v)}' for k, v in batch.items()) + '}'
    if isinstance(batch, (list, tuple)):
        return '(' + ', '.join(_describe_batch(v) for v in batch) + ')'
    return type(batch).__name__


def input_hint(recipe: Recipe, spec: ModelSpec) -> str:
    """What to change in the recipe when the model ``spec`` cannot take the data: the data key that sets the
    inputs' channels or size, or the model's.

    Args:
        recipe (Recipe): The recipe.
        spec (ModelSpec): The model's section.

    Returns:
        str: A sentence, or ``''`` when there is nothing specific to say.
    """
    data = recipe.data
    if data.name == 'digits':
        channels, size = ('data.digits.channels', data.digits.channels), None
    elif data.name == 'image_folder':
        channels, size = ('data.image_folder.channels', data.image_folder.channels), 'data.image_folder.image_size'
    else:
        return 'the model must take the token ids of the data (its vocabulary and position embeddings must cover them)'
    hints = []
    if spec.kind == 'torchvision' and channels[1] != 3:
        hints.append(f'torchvision models take 3-channel images: set {channels[0]}: 3')
    else:
        hints.append(f"{channels[0]} sets the images' channels")
    if size:
        hints.append(f'{size} their size')
    return '; '.join(hints)


def check_model_takes(model: nn.Module, batch, key: str, who: str, hint: str = '') -> None:
    """Run ``model`` once on ``batch`` (eval mode, no gradient) and turn a failure into a recipe problem.

    A model that cannot take the data fails here, before any trainer or run folder exists, rather than inside
    its first training step.

    Args:
        model (nn.Module): A ComposerModel built for the recipe.
        batch: A batch of the recipe's data, as its loaders give it (a few examples).
        key (str): The model's recipe key (``'teachers.0'``, ``'student'``).
        who (str): The model in words (``'teacher 0'``).
        hint (str, optional): What to change (see :func:`input_hint`).

    Raises:
        RecipeError: Naming the key, the batch's shapes, the model's complaint and the hint.

    Example:
        .. testcode::

            import torch
            from composer_kd.run.adapters import classifier
            from composer_kd.recipes.models import check_model_takes

            batch = (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
            check_model_takes(classifier(torch.nn.Flatten(), 64), batch, 'student', 'the student')
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        complaint = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(
            'recipe',
            [
                f'{key}: {who} cannot take this data: on a batch {_describe_batch(batch)} it fails with '
                f'"{complaint}"' + (f'. {hint[:1].upper()}{hint[1:]}' if hint else '')
            ],
        ) from error
    finally:
        for module, training in modes:
            module.training = training
