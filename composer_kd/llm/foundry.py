"""``Distillation`` as llm-foundry builds it from a training YAML, with teachers named as llm-foundry names models.

llm-foundry builds each entry of a YAML's ``algorithms:`` section through its algorithm registry, which finds
``distillation`` through this package's ``llmfoundry_algorithms`` entry point and calls
:class:`FoundryDistillation` with the entry's keys::

    algorithms:
      distillation:
        teachers:
          - name: mpt_causal_lm            # any model llm-foundry's model registry knows
            d_model: 256
            n_layers: 4
            ...                            # the rest of the model's config, as under `model:`
            load_path: teacher/latest-rank0.pt   # optional: a Composer checkpoint to load
        kd_loss: kl
        temperature: 2.0
        kd_loss_weight: 0.5

Each teacher is built by llm-foundry's own ``build_composer_model`` (an MPT, or a Hugging Face causal LM from a
local folder or config with ``pretrained: false``), its checkpoint loaded by
:func:`~composer_kd.models.checkpoints.load_teacher_checkpoint`, and then handed to :class:`~composer_kd.Distillation`,
which keeps it frozen, in eval mode and out of the student's checkpoints. Every other argument of
``Distillation`` passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Event, State
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from composer.utils import dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from composer_kd.distillation import Distillation
from composer_kd.losses import get_loss
from composer_kd.models.checkpoints import load_teacher_checkpoint
from composer_kd.models.outputs import is_causal_lm
from composer_kd.models.rng import preserved_rng
from composer_kd.models.sharding import holds_weights
from composer_kd.models.teachers import TeacherInference
from composer_kd.options import did_you_mean, given_options, refuse_conflicts

try:
    from llmfoundry import registry as foundry_registry
    from llmfoundry.utils.builders import build_composer_model, build_tokenizer
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "composer_kd.llm needs llm-foundry and MosaicML Streaming: pip install 'composer-kd[llm]' "
        f'(importing them failed: {error}).'
    ) from error

__all__ = [
    'FoundryDistillation',
    'build_teacher',
    'check_vocabularies',
    'shifts_labels',
    'vocabulary_size',
]

log = logging.getLogger(__name__)

TeacherConfig = Union[Mapping[str, Any], nn.Module]

# Keys of a teacher's entry that are not the model's own configuration.
_LOAD_PATH, _TOKENIZER = 'load_path', 'tokenizer'


def _known_models() -> list[str]:
    return sorted(foundry_registry.models.get_all())


def _is_remote(path: str) -> bool:
    return '://' in path


def build_teacher(config: TeacherConfig, index: int = 0) -> nn.Module:
    """Build one teacher from its YAML entry through llm-foundry's model registry, loading its checkpoint.

    The entry is a llm-foundry model config, ``{name: <registered model>, **model_config}``, as under a training
    YAML's ``model:``, plus two optional keys of its own: ``load_path``, a Composer checkpoint (or ``state_dict``
    file) read with Composer's ``get_file`` (a local path or any URI Composer reads), and ``tokenizer``,
    ``{name: ..., kwargs: {...}}`` as under the YAML's ``tokenizer:``, for a model whose constructor uses one.
    A model that takes a ``loss_fn`` and is given none gets ``torch_crossentropy``: a teacher's own loss is never
    computed, and llm-foundry's default (a fused CUDA kernel) would refuse to build on a machine without it.
    A module passes through unchanged. ``config`` itself is never modified.

    Building the teacher leaves every random generator as it found it (see
    :func:`~composer_kd.models.rng.preserved_rng`): llm-foundry builds algorithms before the student, whose initial
    weights must not depend on whether a teacher was built first. Rank 0 logs, at ``INFO``, the teacher built and
    the ``load_path`` it loaded (or that it has none).

    Args:
        config (Mapping | nn.Module): The teacher's entry.
        index (int, optional): Its position in ``teachers``, for error messages. Default: ``0``.

    Returns:
        nn.Module: The teacher (a ``ComposerModel``), holding the checkpoint's weights when ``load_path`` is given.

    Raises:
        TypeError: If the entry is neither a mapping nor a module.
        ValueError: If it has no ``name``, or names a model llm-foundry does not know (the message lists those it
            knows), or its checkpoint's weights do not fit the model.
        FileNotFoundError: If a local ``load_path`` does not exist (checked before the model is built).

    Example:
        .. testcode::

            from composer_kd.llm.foundry import build_teacher

            teacher = build_teacher({
                'name': 'mpt_causal_lm', 'd_model': 32, 'n_heads': 2, 'n_layers': 1, 'expansion_ratio': 2,
                'max_seq_len': 16, 'vocab_size': 64, 'attn_config': {'attn_impl': 'torch'},
            })
            assert type(teacher).__name__ == 'ComposerMPTCausalLM'
    """
    where = f'teachers[{index}]'
    if isinstance(config, nn.Module):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(
            f'{where} must be a llm-foundry model config ({{name: mpt_causal_lm, ...}}) or a module, got '
            f'{type(config).__name__}.'
        )
    model_config = dict(config)
    name = model_config.pop('name', None)
    if not isinstance(name, str):
        raise ValueError(
            f"{where} has no model 'name': give one of the models llm-foundry knows, {_known_models()}, as "
            f'under model: in a training YAML.'
        )
    if name not in foundry_registry.models:
        known = _known_models()
        raise ValueError(
            f'{where}.name {name!r} is not a model llm-foundry knows{did_you_mean(name, known)}; known: {known}.'
        )
    load_path = model_config.pop(_LOAD_PATH, None)
    if load_path is not None:
        if not isinstance(load_path, (str, os.PathLike)):
            raise TypeError(f'{where}.load_path must be a path or URI, got {type(load_path).__name__}.')
        load_path = os.fspath(load_path)
        if not _is_remote(load_path) and not os.path.exists(load_path):
            raise FileNotFoundError(f'{where}.load_path: teacher checkpoint not found: {load_path!r}.')
    tokenizer = None
    tokenizer_config = model_config.pop(_TOKENIZER, None)
    if tokenizer_config is not None:
        if not (isinstance(tokenizer_config, Mapping) and isinstance(tokenizer_config.get('name'), str)):
            raise ValueError(f'{where}.tokenizer must be {{name: ..., kwargs: {{...}}}}, got {tokenizer_config!r}.')
    constructor = foundry_registry.models.get(name)
    if 'loss_fn' not in model_config and _takes_argument(constructor, 'loss_fn'):
        model_config['loss_fn'] = 'torch_crossentropy'
    with preserved_rng():
        if tokenizer_config is not None:
            tokenizer = build_tokenizer(tokenizer_config['name'], dict(tokenizer_config.get('kwargs') or {}))
        model = build_composer_model(name=name, cfg=model_config, tokenizer=tokenizer)
    _log_rank_zero('%s: built %s (%s, %s parameters).', where, name, type(model).__name__, f'{_parameters(model):,}')
    if load_path is not None and not holds_weights(model):
        # init_device: meta (or mixed, on ranks other than the first of each node): under FSDP a sharded teacher
        # takes rank zero's weights, so the checkpoint is read once, where the teacher has room for it.
        log.info('%s: built on the meta device; it takes its weights from rank 0 when it is sharded.', where)
    elif load_path is not None:
        load_teacher_checkpoint(model, load_path)
        _log_rank_zero('%s: loaded its weights from load_path %r.', where, load_path)
    else:
        _log_rank_zero('%s: no load_path, so it teaches with the weights it was initialised with.', where)
    return model


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _log_rank_zero(message: str, *arguments: Any) -> None:
    if dist.get_global_rank() == 0:
        log.info(message, *arguments)


def _follow_llm_foundry_log_level() -> None:
    """Give this package's logger the level a YAML's ``python_log_level`` set on llm-foundry's, unless it has one.

    llm-foundry's training script sets the level of the ``llmfoundry`` logger (and Composer's) only; without this,
    the teachers' messages would stay below the root logger's default ``WARNING``.
    """
    ours, foundry = logging.getLogger('composer_kd'), logging.getLogger('llmfoundry')
    if ours.level == logging.NOTSET and foundry.level != logging.NOTSET:
        ours.setLevel(foundry.level)


def _takes_argument(constructor: Callable[..., Any], argument: str) -> bool:
    try:
        return argument in inspect.signature(constructor).parameters
    except (TypeError, ValueError):  # a builtin or an object without a readable signature
        return False


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def vocabulary_size(model: nn.Module) -> Optional[int]:
    """The number of tokens a language model scores: its output embedding's rows, else its config's ``vocab_size``.

    Args:
        model (nn.Module): A ``ComposerMPTCausalLM``, ``ComposerHFCausalLM``, Composer ``HuggingFaceModel`` or
            Hugging Face ``PreTrainedModel`` (DDP-wrapped or not).

    Returns:
        int | None: The size, or ``None`` for a model that says nothing about one.

    Example:
        .. testcode::

            import transformers
            from composer_kd.llm.foundry import vocabulary_size

            config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
            assert vocabulary_size(transformers.GPT2LMHeadModel(config)) == 50
    """
    model = _unwrapped(model)
    inner = model.model if isinstance(model, HuggingFaceModel) else model
    get_output_embeddings = getattr(inner, 'get_output_embeddings', None)
    embeddings = get_output_embeddings() if callable(get_output_embeddings) else None
    weight = getattr(embeddings, 'weight', None)
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    size = getattr(getattr(inner, 'config', None), 'vocab_size', None)
    return int(size) if isinstance(size, int) else None


def check_vocabularies(teachers: Sequence[nn.Module], student: nn.Module) -> None:
    """Refuse teachers whose vocabulary differs in size from the student's, naming both sizes.

    Distillation compares the teacher's and the student's distributions token by token, so both must score the
    same tokens; a teacher trained with another tokenizer (or another padded ``vocab_size``) would otherwise fail
    at the first step with a bare shape error, or, worse, pair unrelated tokens.

    Args:
        teachers (Sequence[nn.Module]): The teachers.
        student (nn.Module): The student.

    Raises:
        ValueError: For the first teacher whose vocabulary size differs from the student's.

    Example:
        .. testcode::

            import transformers
            from composer_kd.llm.foundry import check_vocabularies

            def model(vocab_size):
                config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab_size)
                return transformers.GPT2LMHeadModel(config)

            check_vocabularies([model(50)], model(50))
    """
    student_size = vocabulary_size(student)
    if student_size is None:
        return
    for i, teacher in enumerate(teachers):
        teacher_size = vocabulary_size(teacher)
        if teacher_size is not None and teacher_size != student_size:
            raise ValueError(
                f'teachers[{i}] ({type(_unwrapped(teacher)).__name__}) scores {teacher_size} tokens but the student '
                f'({type(_unwrapped(student)).__name__}) scores {student_size}: distillation compares their '
                'distributions token by token, so both need the same tokenizer and vocab_size (set the '
                f"teacher's vocab_size to {student_size}, or train it with the student's tokenizer)."
            )


def shifts_labels(model: nn.Module) -> bool:
    """Whether the logits at position ``i`` of ``model`` are scored against the label of token ``i + 1``.

    llm-foundry's models say so themselves: ``ComposerMPTCausalLM`` and ``ComposerHFCausalLM`` carry
    ``shift_labels`` (``True`` unless the model was configured with labels already shifted), and their loss
    shifts the batch's ``labels`` by one. Any other model is judged by
    :func:`~composer_kd.models.outputs.is_causal_lm`.

    Example:
        .. testcode::

            import torch
            from composer_kd.llm.foundry import shifts_labels

            assert not shifts_labels(torch.nn.Linear(2, 2))
    """
    model = _unwrapped(model)
    shift = getattr(model, 'shift_labels', None)
    if isinstance(shift, bool):
        return shift
    return is_causal_lm(model)


def _kd_loss(kd_loss: Any) -> Any:
    """A loss given by name (``'kl'``) or by ``{name: 'kl', **arguments}``, built; anything else as it is."""
    if isinstance(kd_loss, Mapping):
        arguments = dict(kd_loss)
        name = arguments.pop('name', None)
        if not isinstance(name, str):
            raise ValueError(f'kd_loss must be a loss name or {{name: <loss>, ...arguments}}, got {kd_loss!r}.')
        return get_loss(name, **arguments)
    return kd_loss


def _teacher_inference(options: Any) -> Any:
    """``teacher_inference`` given in YAML as ``{shard: false, dtype: bfloat16, ...}``, built; anything else as it
    is."""
    if not isinstance(options, Mapping):
        return options
    fields = {field.name for field in dataclasses.fields(TeacherInference)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f'teacher_inference: unknown key {unknown[0]!r}{did_you_mean(unknown[0], sorted(fields))}; known: '
            f'{sorted(fields)}.'
        )
    arguments = dict(options)
    dtype = arguments.get('dtype')
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f'teacher_inference.dtype: {dtype!r} is not a torch dtype (e.g. bfloat16).')
        arguments['dtype'] = getattr(torch, dtype)
    return TeacherInference(**arguments)


def _teacher_configs(teachers: Any) -> Sequence[TeacherConfig]:
    """``teachers`` as a list: one config or module alone is a list of one."""
    if teachers is None:
        return []
    if isinstance(teachers, (Mapping, nn.Module)):
        return [teachers]
    if isinstance(teachers, str) or not isinstance(teachers, Sequence):
        raise TypeError(
            'teachers must be a list of llm-foundry model configs ([{name: mpt_causal_lm, ...}]), got '
            f'{type(teachers).__name__}.'
        )
    return teachers


def _signal(teacher_signal: Any, teachers: Any) -> Any:
    """The :class:`~composer_kd.signal.TeacherSignal` a YAML's ``teacher_signal`` names (``true`` or its keys)."""
    if teachers:
        raise ValueError(
            'teachers and teacher_signal were both given: distil either from teachers run at each step or from the '
            'stored signal in the batches, not both.'
        )
    if teacher_signal is not True and not isinstance(teacher_signal, Mapping):
        raise TypeError(
            f'teacher_signal must be true or a mapping of TeacherSignal arguments (its batch keys), got '
            f'{teacher_signal!r}.'
        )
    from composer_kd.signal import TeacherSignal

    return TeacherSignal(**({} if teacher_signal is True else dict(teacher_signal)))


class FoundryDistillation(Distillation):
    """:class:`~composer_kd.Distillation` built from a llm-foundry training YAML's ``algorithms: {distillation:
    {...}}``: teachers are llm-foundry model configs, built by llm-foundry's own model builders.

    The teachers are built (and their checkpoints loaded) when the algorithm is made, so that a bad name or path
    fails before training starts, leaving every random generator as it was: the student llm-foundry builds next
    starts from the same weights, same seed, as without the ``distillation`` section. When the fit starts, before
    the student's weights change, each teacher's vocabulary size is checked against the student's, and the causal
    shift follows the student's own ``shift_labels`` (position ``i`` is distilled where token ``i + 1``'s label is
    not ``-100`` and neither token is padding, as llm-foundry's loss counts tokens).

    Args:
        teachers (Sequence[Mapping | nn.Module]): One entry per teacher: a llm-foundry model config
            ``{name: mpt_causal_lm, ...}`` or ``{name: hf_causal_lm, pretrained_model_name_or_path: <folder>,
            pretrained: false, ...}``, with optional ``load_path`` (a Composer checkpoint) and ``tokenizer``
            (see :func:`build_teacher`); a module passes through as it is.
        kd_loss (str | Mapping | Callable, optional): The distillation loss: a name (``'kl'``, ``'reverse_kl'``,
            ``'js'``, ... as :func:`~composer_kd.get_loss` takes them), ``{name: ..., **arguments}``, or a callable.
            Default: ``KLDivergence(temperature=4.0)``.
        temperature (float, optional): Softening temperature set on the loss. Default: ``None``, the loss's own.
        kd_loss_weight (float, optional): Weight of the distillation term. Default: ``1.0``.
        org_loss_weight (float, optional): Weight of the student's own (next-token) loss. Default: ``1.0``.
        causal_lm (bool, optional): Force or disable the one-token shift. Default: ``None``, the student's own
            ``shift_labels``.
        teacher_signal (bool | Mapping, optional): Distil from the offline teacher signal that the ``teacher_signal``
            dataloader puts in each batch instead of running teachers: ``true``, or the arguments of
            :class:`~composer_kd.signal.TeacherSignal` (its batch keys). Not with ``teachers``. Default: ``None``.
        **options: Every other argument of :class:`~composer_kd.Distillation` (``start``, ``end``, ``name``,
            ``n_teachers_to_sample``, ...), passed through unchanged; a misspelled one is refused naming the
            nearest, and options that do not combine (:data:`composer_kd.options.CONFLICTS`) before any teacher
            is built.

    Example:
        .. testcode::

            from llmfoundry.utils.builders import build_algorithm

            teacher = {
                'name': 'mpt_causal_lm', 'd_model': 32, 'n_heads': 2, 'n_layers': 1, 'expansion_ratio': 2,
                'max_seq_len': 16, 'vocab_size': 64, 'attn_config': {'attn_impl': 'torch'},
            }
            distillation = build_algorithm(
                'distillation', {'teachers': [teacher], 'kd_loss': 'kl', 'temperature': 2.0, 'kd_loss_weight': 0.5}
            )
            assert distillation.temperature == 2.0  # set on the loss when the fit starts
    """

    def __init__(
        self,
        teachers: Optional[Sequence[TeacherConfig]] = None,
        kd_loss: Any = None,
        temperature: Optional[float] = None,
        kd_loss_weight: float = 1.0,
        org_loss_weight: float = 1.0,
        causal_lm: Optional[bool] = None,
        teacher_signal: Union[bool, Mapping[str, str], None] = None,
        **options: Any,
    ):
        _follow_llm_foundry_log_level()
        if 'teacher_inference' in options:
            options['teacher_inference'] = _teacher_inference(options['teacher_inference'])
        signal = _signal(teacher_signal, teachers) if teacher_signal not in (None, False) else None
        # Refused before any teacher is built, which can take minutes; Distillation checks the same table.
        refuse_conflicts(given_options(teachers=signal, **options))
        # llm-foundry builds the student after this: it must start from the generators as the seed left them.
        with preserved_rng():
            if signal is not None:
                source = signal
            else:
                source = [build_teacher(config, index) for index, config in enumerate(_teacher_configs(teachers))]
            super().__init__(
                source,
                kd_loss_fn=_kd_loss(kd_loss),
                org_loss_weight=org_loss_weight,
                kd_loss_weight=kd_loss_weight,
                causal_lm=causal_lm,
                temperature=temperature,
                **options,
            )
        self._causal_lm_given = causal_lm

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.FIT_START:
            check_vocabularies(self.teacher_modules, state.model)
            if self._causal_lm_given is None:
                self.causal_lm = shifts_labels(state.model)
        super().apply(event, state, logger)


def _signature() -> inspect.Signature:
    """``FoundryDistillation``'s own parameters, then every keyword of ``Distillation`` it passes through.

    ``Distillation`` checks keyword names against the class's signature (suggesting the nearest on a typo), so
    the pass-through arguments are listed here, read from ``Distillation`` itself: an argument added there is
    accepted here too.
    """
    own = list(inspect.signature(FoundryDistillation.__init__).parameters.values())[1:-1]
    taken = {p.name for p in own} | {'teachers', 'kd_loss_fn'}
    passed = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in Distillation.__signature__.parameters.values()
        if p.name not in taken
    ]
    return inspect.Signature([*own, *passed])


FoundryDistillation.__signature__ = _signature()
