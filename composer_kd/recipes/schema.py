"""What a recipe may say: every section and key, its type and its default, as dataclasses.

The dataclasses are the single source of truth. The loader checks a YAML file against them key by key (so an
unknown key gets the nearest known one as a suggestion) and then hands them to ``OmegaConf.structured``, whose
merge converts and type-checks the values.

The sections that hold the arguments of one of ``Distillation``'s option classes (``distillation.on_policy``:
:class:`~composer_kd.OnPolicy`, ``distillation.feature_pairs``: :class:`~composer_kd.FeaturePair`) are not copied
here: an :class:`OptionSection` names the class, and its keys, types and defaults are read from the class when a
recipe sets the section. The class's own checks then judge the values. This module imports neither torch nor the
option classes, so the command lists and prints recipes without them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from omegaconf import MISSING

__all__ = [
    'FEATURE_PAIR',
    'ON_POLICY',
    'SECTION',
    'ComponentSpec',
    'CompressionSpec',
    'DataSpec',
    'DigitsSpec',
    'DistillationSpec',
    'GlueSpec',
    'ImageFolderSpec',
    'LossSpec',
    'MdsTokensSpec',
    'ModelSpec',
    'OptionSection',
    'OptimizerSpec',
    'PruningSpec',
    'QATSpec',
    'Recipe',
    'ScheduleSpec',
    'SearchGridSpec',
    'SyntheticTextSpec',
    'TaskSpec',
    'TeacherSpec',
    'TeacherTrainingSpec',
    'TextFilesSpec',
    'option_sections',
    'recipe_type',
]


#: The key of a schema field's ``metadata`` that makes the field an option section: its :class:`OptionSection`.
SECTION = 'option_section'

_SCALARS = (bool, int, float, str)


def recipe_type(hint: Any) -> Any:
    """The part of a type hint that YAML can hold, or ``None`` when it holds none of it.

    Scalars, ``Any``, lists and mappings with string keys stay as they are; a union keeps the members YAML can
    hold (``Union[float, Schedule]`` is ``float``, ``Union[str, Callable]`` is ``str``). Objects, callables and
    tuples cannot be written in a recipe.

    Args:
        hint (Any): A type hint of an option class's field.

    Returns:
        Any: The type a recipe's value is checked against, or ``None``.

    Example:
        .. testcode::

            from typing import Callable, Optional, Union
            from composer_kd.recipes.schema import recipe_type

            assert recipe_type(Union[str, Callable[[int], int]]) is str
            assert recipe_type(Optional[Union[int, list[int]]]) == Optional[Union[int, list[int]]]
            assert recipe_type(Callable[[int], int]) is None
    """
    if hint is Any or hint in _SCALARS or hint is type(None):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        members = [member for member in (recipe_type(a) for a in args) if member is not None]
        if not members or members == [type(None)]:
            return None
        return Union[tuple(members)]
    if origin in (list, collections.abc.Sequence):
        item = recipe_type(args[0]) if args else Any
        return None if item is None else list[item]
    if origin in (dict, collections.abc.Mapping):
        if args and args[0] is not str:
            return None
        value = recipe_type(args[1]) if args else Any
        return None if value is None else dict[str, value]
    return None


@dataclass(frozen=True)
class OptionSection:
    """A recipe section holding the arguments of an option class of ``Distillation`` (a dataclass).

    The section's keys are the class's init fields, each typed as a recipe can write it (see :func:`recipe_type`)
    and defaulting to the class's default; a field YAML cannot hold (a callable, a schedule) is left to its
    default. The class is named, not imported: it is read, with torch, only when a recipe sets the section.

    Args:
        module (str): The module that defines the class.
        name (str): The class's name.

    Example:
        .. testcode::

            import dataclasses
            from composer_kd import OnPolicy
            from composer_kd.recipes.schema import ON_POLICY

            keys = [f.name for f in dataclasses.fields(ON_POLICY.spec())]
            assert ON_POLICY.option_class() is OnPolicy and 'eos_token_id' in keys
    """

    module: str
    name: str

    def option_class(self) -> type:
        """The option class (importing its module)."""
        return getattr(importlib.import_module(self.module), self.name)

    def spec(self) -> type:
        """A dataclass with one field per key of the section: its recipe type and the class's default."""
        return _section_spec(self)


@functools.cache
def _section_spec(section: OptionSection) -> type:
    option_class = section.option_class()
    hints = typing.get_type_hints(option_class)
    spec_fields = []
    for f in dataclasses.fields(option_class):
        hint = recipe_type(hints[f.name])
        if not f.init or hint is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field(default=MISSING)
        spec_fields.append((f.name, hint, default))
    return dataclasses.make_dataclass(f'{option_class.__name__}Section', spec_fields)


#: ``distillation.feature_pairs``: each entry the arguments of :class:`composer_kd.FeaturePair`.
FEATURE_PAIR = OptionSection('composer_kd.parts.features', 'FeaturePair')
#: ``distillation.on_policy``: the arguments of :class:`composer_kd.OnPolicy`.
ON_POLICY = OptionSection('composer_kd.parts.onpolicy', 'OnPolicy')


@dataclass
class ModelSpec:
    """A model: how to build it and, optionally, weights to load into it.

    ``kind`` is one of:

    * ``mlp``: a multilayer perceptron on the flattened input, hidden widths ``hidden``;
    * ``cnn``: 3x3 convolutions of ``channels`` (a 2x2 max-pool after the last), then ``hidden`` linear layers;
    * ``torchvision``: the constructor ``torchvision.models.<name>(weights=None, num_classes=..., **kwargs)``;
    * ``hf_config``: a Hugging Face sequence classifier built offline from ``AutoConfig.for_model(name, **kwargs)``
      (``name`` is a model type such as ``bert``), randomly initialized;
    * ``huggingface``: a pretrained Hugging Face model read from disk: ``name`` is a local directory or a Hub id
      already in the local Hugging Face cache (nothing is downloaded).

    ``checkpoint`` (a Composer checkpoint or ``state_dict`` file, local or any URI Composer reads) is loaded last.

    With multi-task data (``data.digits.tasks``) an ``mlp`` or ``cnn`` gets one linear head per task on top of its
    layers (a :class:`~composer_kd.multitask.MultiTaskClassifier`); ``tasks`` limits them to some of the data's
    tasks, e.g. a teacher of one task.
    """

    kind: str = MISSING
    name: Optional[str] = None
    hidden: list[int] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    dropout: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    tasks: list[str] = field(default_factory=list)


@dataclass
class OptimizerSpec:
    """An optimizer from ``composer.optim`` or ``torch.optim`` by class name (``DecoupledAdamW``, ``Adam``, ...)."""

    name: str = 'Adam'
    lr: float = 1e-3
    weight_decay: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ComponentSpec:
    """A Composer object by class name and its keyword arguments: an algorithm, a scheduler, a logger."""

    name: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherTrainingSpec:
    """Train this teacher first, as part of the recipe, before distilling from it.

    ``optimizer`` and ``scheduler`` default to the recipe's. ``data`` overrides keys of the recipe's ``data``
    section for the teacher only (e.g. ``{digits: {per_class: null}}`` to train it on every label).
    """

    max_duration: str = '1ep'
    optimizer: Optional[OptimizerSpec] = None
    scheduler: Optional[ComponentSpec] = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherSpec(ModelSpec):
    """A teacher: a model (see :class:`ModelSpec`), and optionally how to train it first."""

    train: Optional[TeacherTrainingSpec] = None


@dataclass
class DigitsSpec:
    """scikit-learn's bundled 8x8 handwritten digits (see :func:`composer_kd.recipes.data.load_digits_splits`).

    ``tasks`` makes the data multi-task: each image is labelled for every task named, among ``digit`` (its
    class), ``parity`` and ``at_least_5`` (see :data:`composer_kd.recipes.data.DIGITS_TASKS`).
    """

    val_fraction: float = 0.2
    test_fraction: float = 0.3
    split_seed: int = 0
    per_class: Optional[int] = None
    keep_unlabelled: bool = False
    labelled_per_batch: Optional[int] = None
    channels: int = 1
    tasks: list[str] = field(default_factory=list)


@dataclass
class SyntheticTextSpec:
    """Generated token sequences to classify (see :func:`composer_kd.recipes.data.synthetic_text_classification`)."""

    n_train: int = 2000
    n_val: int = 500
    vocab_size: int = 200
    seq_len: int = 24
    n_classes: int = 3
    keywords_per_class: int = 8
    label_noise: float = 0.05
    seed: int = 0


@dataclass
class GlueSpec:
    """A GLUE task read from its original TSV files in ``folder`` (``train.tsv``, ``dev.tsv``; required).

    ``tokenizer`` is a local directory or cached Hub id; by default the student's.
    """

    task: str = 'qnli'
    folder: Optional[str] = None
    max_length: int = 128
    tokenizer: Optional[str] = None
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None


@dataclass
class ImageFolderSpec:
    """Images in class folders on disk, as torchvision's ``ImageFolder`` reads them: ``folder/<split>/<class>/*.png``.

    ``folder`` holds one sub-folder per split (``train/`` and e.g. ``val/``, ``test/``), each holding one folder per
    class, the same classes in every split (their sorted names give the labels). Every image is read as
    ``channels`` channels (1: grayscale, 3: RGB), made a float tensor in ``[0, 1]``, resized to ``image_size`` x
    ``image_size`` when set, and passed through ``train_transforms`` (training) or ``eval_transforms``
    (evaluation): classes of ``torchvision.transforms.v2`` by name with their ``kwargs``, e.g.
    ``RandomHorizontalFlip``, ``RandomCrop``, ``Normalize``. The evaluated split is ``val`` by default.
    """

    folder: Optional[str] = None
    train_split: str = 'train'
    channels: int = 3
    image_size: Optional[int] = None
    train_transforms: list[ComponentSpec] = field(default_factory=list)
    eval_transforms: list[ComponentSpec] = field(default_factory=list)


@dataclass
class TextFilesSpec:
    """Labelled texts on disk: a file per split (``files``: CSV, TSV, JSON Lines or a JSON list of objects), or
    a folder written by ``datasets``' ``save_to_disk`` (``folder``: a ``DatasetDict``, one dataset per split).

    ``text_column`` (and ``text_pair_column`` for sentence pairs) and ``label_column`` name the columns. Labels
    may be class names (sorted to give indices) or integers (their own index; a ``ClassLabel`` keeps its order);
    every split must use the training split's labels. Texts are tokenized with ``tokenizer`` (a local directory
    or a cached Hub id; by default the student's, for a ``huggingface`` student), padded and cut to ``max_length``
    tokens. The evaluated split is ``val`` by default.
    """

    files: dict[str, str] = field(default_factory=dict)
    folder: Optional[str] = None
    train_split: str = 'train'
    text_column: str = 'text'
    text_pair_column: Optional[str] = None
    label_column: str = 'label'
    tokenizer: Optional[str] = None
    max_length: int = 128


@dataclass
class MdsTokensSpec:
    """Token sequences for causal language models, in MosaicML Streaming (MDS) shards as llm-foundry writes them.

    ``path`` is a local folder or a remote URI (``s3://bucket/data``, any scheme MosaicML Streaming reads) holding
    one sub-folder per split (``train/`` and e.g. ``val/``), each with its ``index.json`` and shards. Each sample
    holds one sequence of token ids in ``column``: ``tokens`` (bytes of ``token_dtype`` integers, llm-foundry's
    text format) or ``input_ids`` (an array, or bytes as for ``tokens``); by default whichever the shards have.
    Sequences are cut to ``max_seq_len`` tokens, and shorter ones padded (padding is masked from the models and
    the loss). A remote dataset's shards are downloaded to ``cache`` (by default a folder under the system's
    temporary directory named after the URI). ``vocab_size`` is the vocabulary the ids come from; a model built
    from a config gets it (as does ``kwargs.vocab_size``). Before anything trains, the first ``check_samples``
    sequences of every split are read and their largest id is checked against every model's vocabulary.
    The evaluated split is ``val`` by default; the models are scored by loss (cross-entropy in nats per token)
    and perplexity.
    """

    path: Optional[str] = None
    train_split: str = 'train'
    column: Optional[str] = None
    token_dtype: str = 'int64'
    max_seq_len: int = 128
    vocab_size: Optional[int] = None
    cache: Optional[str] = None
    check_samples: int = 1000


@dataclass
class DataSpec:
    """The dataset (``name``: ``digits``, ``synthetic_text``, ``glue``, ``image_folder``, ``text`` or ``mds``) and
    its batches.

    Only the section named by ``name`` is used. ``eval_splits`` default to the dataset's validation split.
    ``drop_last`` drops each epoch's last, incomplete training batch; by default (``null``) it is dropped for the
    training of a model with BatchNorm layers only, which cannot train on a batch of one example.
    """

    name: str = MISSING
    batch_size: int = 32
    eval_batch_size: int = 256
    drop_last: Optional[bool] = None
    eval_splits: Optional[list[str]] = None
    digits: DigitsSpec = field(default_factory=DigitsSpec)
    synthetic_text: SyntheticTextSpec = field(default_factory=SyntheticTextSpec)
    glue: GlueSpec = field(default_factory=GlueSpec)
    image_folder: ImageFolderSpec = field(default_factory=ImageFolderSpec)
    text: TextFilesSpec = field(default_factory=TextFilesSpec)
    mds: MdsTokensSpec = field(default_factory=MdsTokensSpec)


@dataclass
class ScheduleSpec:
    """A value that changes over training: ``kind`` ``constant``, ``linear`` or ``cosine`` (composer_kd.schedules)."""

    kind: str = 'linear'
    start_value: float = MISSING
    end_value: float = MISSING
    start: str = '0dur'
    end: str = '1dur'


@dataclass
class TaskSpec:
    """One task of a multi-task student, taught by its own teachers: a ``Distillation`` named after the task.

    ``teachers`` are indices into the recipe's ``teachers`` (default: every teacher with a head for the task).
    ``loss``, ``temperature`` and ``kd_loss_weight`` default to the ``distillation`` section's; the logits keys
    to the task's name (the head of that name, in the student and in the teachers).
    """

    name: str = MISSING
    teachers: list[int] = field(default_factory=list)
    loss: Optional[str] = None
    temperature: Optional[float] = None
    kd_loss_weight: Optional[float] = None
    student_logits_key: Optional[str] = None
    teacher_logits_key: Optional[str] = None


@dataclass
class DistillationSpec:
    """Every argument of :class:`composer_kd.Distillation`.

    ``loss`` names a loss of ``composer_kd.LOSSES`` (``kl``, ``reverse_kl``, ``js``, ``soft_ce``, ``mse``,
    ``cosine``, ``dkd``); ``loss_options`` are its further arguments (``{alpha: 1, beta: 8}`` for ``dkd``, and
    ``{standardize: true}`` for logit standardization of any loss). ``start`` / ``end`` are Composer time
    strings or fractions of training. ``schedules`` may hold ``temperature``, ``org_loss_weight`` and
    ``kd_loss_weight`` schedules, which replace the constants.
    ``enabled: false`` trains the student alone (the teachers are still built, trained and evaluated).
    ``tasks`` distils a multi-task student: one ``Distillation`` per task, each with its own teachers, weight and
    temperature, while ``org_loss_weight`` weights the student's own loss once.
    ``feature_pairs`` match intermediate modules, each entry the arguments of :class:`composer_kd.FeaturePair`;
    ``on_policy`` trains a causal language model on sequences it (or the teacher) generates, the arguments of
    :class:`composer_kd.OnPolicy`. Both are option sections (see :class:`OptionSection`): their keys, types and
    defaults are the option class's own.
    """

    enabled: bool = True
    loss: str = 'kl'
    loss_options: dict[str, Any] = field(default_factory=dict)
    temperature: float = 4.0
    org_loss_weight: float = 1.0
    kd_loss_weight: float = 1.0
    start: str = '0dur'
    end: Optional[str] = None
    n_teachers_to_sample: Optional[int] = None
    schedules: dict[str, ScheduleSpec] = field(default_factory=dict)
    feature_pairs: list[dict[str, Any]] = field(default_factory=list, metadata={SECTION: FEATURE_PAIR})
    tasks: list[TaskSpec] = field(default_factory=list)
    on_policy: Optional[dict[str, Any]] = field(default=None, metadata={SECTION: ON_POLICY})


@dataclass
class LossSpec:
    """A distillation loss by name (a key of ``composer_kd.LOSSES``) and its further arguments.

    ``options`` e.g. ``{alpha: 1, beta: 8}`` for ``dkd``, ``{standardize: true}`` for logit standardization.
    """

    name: str = MISSING
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchGridSpec:
    """Choose the distillation settings on a validation split before the run (see :mod:`composer_kd.run.search`).

    The grid is the product of ``losses``, ``temperatures``, ``kd_loss_weights`` and ``org_loss_weights``; an
    empty list keeps the ``distillation`` section's value. Every candidate is trained from the same initial
    student, with the same batches and seed, for ``max_duration`` (a short budget; default: the recipe's), and
    scored on ``split`` (an entry of ``data.eval_splits``, never ``test``) by the student's first metric. The
    best (the first on a tie) is then trained with the recipe's budget and reported on the other splits; the
    summary lists every candidate and its score.
    """

    losses: list[LossSpec] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    kd_loss_weights: list[float] = field(default_factory=list)
    org_loss_weights: list[float] = field(default_factory=list)
    max_duration: Optional[str] = None
    split: str = 'val'


@dataclass
class QATSpec:
    """Quantization-aware training of the student (:class:`composer_kd.compression.QuantizationAwareTraining`).

    ``backend`` is the int8 engine (``x86``, ``fbgemm``, ``qnnpack``, ``onednn``; it must be in
    ``torch.backends.quantized.supported_engines``). ``freeze_observers`` / ``freeze_bn_stats`` are times (Composer
    time strings or fractions of training) from which quantization ranges / BatchNorm statistics stay fixed. After
    training the student's observers are frozen, and it is evaluated fake-quantized and, converted to int8, on the
    CPU.
    """

    backend: str = 'x86'
    freeze_observers: Optional[str] = None
    freeze_bn_stats: Optional[str] = None


@dataclass
class PruningSpec:
    """Magnitude pruning of the student during training (:class:`composer_kd.compression.Pruning`).

    ``amount`` is each layer's share pruned, in ``[0, 1)``: of its weights, or with ``structured: true`` of its
    output units. ``modules`` are layer paths in the student (e.g. ``module.1``); by default every Linear and Conv
    layer but the last. Pruning happens at ``start`` at once, or, with ``end``, rises gradually from 0 at ``start``
    to ``amount`` at ``end``.
    """

    amount: float = MISSING
    structured: bool = False
    modules: Optional[list[str]] = None
    start: str = '0dur'
    end: Optional[str] = None


@dataclass
class CompressionSpec:
    """Compressing the student (never the teachers) while it is trained; the student alone gets the same."""

    qat: Optional[QATSpec] = None
    pruning: Optional[PruningSpec] = None


@dataclass
class Recipe:
    """A whole distillation run: student, teachers, data, distillation and the Composer ``Trainer``'s settings.

    ``algorithms`` are other Composer algorithms by class name (looked up in ``composer.algorithms``);
    ``loggers`` are Composer logger destinations by class name (``composer.loggers``). ``baseline: true`` also
    trains the student alone with the same data, budget and seed, and reports the distillation ratio.
    ``compression`` quantizes and/or prunes the student (and the student alone) during training. ``search``
    chooses the distillation's loss, temperature and weights on a validation split first.

    ``save_folder`` is the run's folder: the student's checkpoints go to ``student/``, those of each teacher trained
    here to ``teacher-<i>/``. A run refuses a folder that is not empty, so that no earlier run is lost;
    ``overwrite: true`` replaces the earlier run's checkpoints, and ``resume: true`` continues the run whose
    checkpoints the folder holds (Composer's autoresume): the student from its latest checkpoint, with the same
    batches, optimizer, schedule and distillation state, and a teacher whose training finished is not trained again.
    """

    name: str = 'recipe'
    description: str = ''
    student: ModelSpec = MISSING
    teachers: list[TeacherSpec] = MISSING
    data: DataSpec = MISSING
    distillation: DistillationSpec = field(default_factory=DistillationSpec)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    algorithms: list[ComponentSpec] = field(default_factory=list)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    scheduler: Optional[ComponentSpec] = None
    max_duration: str = '1ep'
    eval_interval: str = '1ep'
    seed: int = 17
    precision: Optional[str] = None
    device: Optional[str] = None
    device_train_microbatch_size: Optional[int] = None
    save_folder: Optional[str] = None
    save_interval: str = '1ep'
    overwrite: bool = False
    resume: bool = False
    loggers: list[ComponentSpec] = field(default_factory=list)
    progress_bar: bool = True
    baseline: bool = False
    search: Optional[SearchGridSpec] = None


def option_sections(spec: type = Recipe, key: str = '') -> dict[str, OptionSection]:
    """Every option section of the schema, by its dotted key: ``{'distillation.on_policy': ON_POLICY, ...}``.

    Args:
        spec (type, optional): The section to look in. Default: the whole :class:`Recipe`.
        key (str, optional): The dotted key of ``spec``, put before the keys found. Default: none.

    Returns:
        dict[str, OptionSection]: The option sections, in the schema's order.

    Example:
        .. testcode::

            from composer_kd.recipes.schema import FEATURE_PAIR, option_sections

            assert option_sections()['distillation.feature_pairs'] is FEATURE_PAIR
    """
    found = {}
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        dotted = f'{key}.{f.name}' if key else f.name
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else []
        hint = inner[0] if len(inner) == 1 else hint
        if SECTION in f.metadata:
            found[dotted] = f.metadata[SECTION]
        elif dataclasses.is_dataclass(hint):
            found.update(option_sections(hint, dotted))
    return found
