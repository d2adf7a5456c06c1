"""Intermediate-feature and attention distillation: modules named by path, captured with forward hooks.

Neither model is changed: forward hooks on the named modules record their outputs during the student's and
the teacher's ordinary forward passes, and are removed when the fit ends. Where the student's features are
narrower than the teacher's, a learnable projection owned by the algorithm (never by the student) maps them
across.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from composer.core import Event, State
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from composer.utils import dist, ensure_tuple
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from composer_kd.losses.features import (
    FEATURE_LOSSES,
    FeatureLossFn,
    attention_map,
    attention_map_loss,
    attention_probs_mse,
    feature_dim,
)
from composer_kd.models.outputs import padding_mask
from composer_kd.options import nearest_names
from composer_kd.parts.base import FitContext, LossTerms, Part

__all__ = [
    'FEATURE_LOSSES',
    'FeatureCapture',
    'FeatureDistillation',
    'FeaturePair',
    'attention_map',
    'attention_map_loss',
    'attention_probs_mse',
    'feature_dim',
    'output_width',
    'resolve_module',
    'select_output',
]


@dataclass(frozen=True)
class FeaturePair:
    """One student module to match to one teacher module.

    Args:
        student (str): Dotted module path in the student, as ``named_modules()`` lists it, e.g.
            ``'bert.encoder.layer.1'`` (paths may also include or omit Composer's wrapper, ``model.`` /
            ``module.``).
        teacher (str): Dotted module path in the teacher.
        loss (str | Callable, optional): ``'mse'``, ``'cosine'``, ``'attention_map'`` (CNN feature maps, Zagoruyko
            & Komodakis) or ``'attention_probs'`` (transformer attention probabilities, TinyBERT), or a callable
            ``(student_features, teacher_features, mask) -> scalar``. Default: ``'mse'``.
        weight (float, optional): The term's weight in the total loss. Default: ``1.0``.
        teacher_index (int, optional): Which teacher, when there are several. Default: ``0``.
        output_index (int, optional): Which element of a module's tuple output to take; attention modules of
            Hugging Face models return their probabilities second. Default: ``0``, or ``1`` for
            ``'attention_probs'``.
        student_dim (int, optional): The student features' width, where it cannot be read off the module.
        teacher_dim (int, optional): The teacher features' width, likewise.

    Example:
        .. testcode::

            import torch
            from composer_kd import Distillation, FeaturePair

            teacher = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
            # Match the student's first layer (16 wide) to the teacher's (64 wide) through a learned projection.
            pair = FeaturePair(student='0', teacher='0', loss='cosine', weight=0.5)
            distillation = Distillation(teacher, feature_pairs=[pair])
    """

    student: str
    teacher: str
    loss: Union[str, FeatureLossFn] = 'mse'
    weight: float = 1.0
    teacher_index: int = 0
    output_index: Optional[int] = None
    student_dim: Optional[int] = None
    teacher_dim: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.loss, str) and self.loss not in FEATURE_LOSSES:
            raise ValueError(f'FeaturePair loss {self.loss!r} is unknown; known: {sorted(FEATURE_LOSSES)}.')
        if not callable(self.loss) and not isinstance(self.loss, str):
            raise TypeError(f'FeaturePair loss must be a name or a callable, got {type(self.loss).__name__}.')
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):
            raise ValueError(f'FeaturePair weight must be a number >= 0, got {self.weight!r}.')

    @property
    def loss_fn(self) -> FeatureLossFn:
        return FEATURE_LOSSES[self.loss] if isinstance(self.loss, str) else self.loss

    @property
    def index(self) -> int:
        if self.output_index is not None:
            return self.output_index
        return 1 if self.loss == 'attention_probs' else 0

    @property
    def projectable(self) -> bool:
        """Whether width differences are bridged by a projection (losses comparing features element-wise)."""
        return self.loss in ('mse', 'cosine')


def _candidate_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model and the wrapped models inside it, outermost first, with the prefix each adds."""
    roots = [('', model)]
    if isinstance(model, DistributedDataParallel):
        roots.append(('module.', model.module))
        model = model.module
    if isinstance(model, HuggingFaceModel):
        roots.append(('model.', model.model))
    elif isinstance(getattr(model, 'module', None), nn.Module):
        roots.append(('module.', model.module))
    return roots


def resolve_module(model: nn.Module, path: str, role: str = 'student') -> nn.Module:
    """The submodule of ``model`` at ``path``, looked up also inside Composer's and DDP's wrappers.

    Args:
        model (nn.Module): The model (possibly a ``ComposerModel`` or DDP-wrapped).
        path (str): A dotted path as ``named_modules()`` gives it.
        role (str, optional): ``'student'`` or ``'teacher'``, for the error message.

    Returns:
        nn.Module: The submodule.

    Raises:
        ValueError: If no such module exists; the message lists the nearest existing names.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.features import resolve_module

            model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
            assert isinstance(resolve_module(model, '1'), torch.nn.ReLU)
    """
    for _, root in _candidate_roots(model):
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    names = [name for name, _ in _candidate_roots(model)[-1][1].named_modules() if name]
    nearest = nearest_names(path, names, n=5, cutoff=0.5)
    raise ValueError(
        f'The {role} has no module {path!r}. Nearest existing names: {nearest or names[:5]}'
        f' (of {len(names)}; list them with model.named_modules()).'
    )


def output_width(module: nn.Module) -> Optional[int]:
    """The width of the features ``module`` outputs, read off its last layer of a known kind, or ``None``.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.features import output_width

            block = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.LayerNorm(32))
            assert output_width(block) == 32
    """
    for sub in reversed(list(module.modules())):
        if isinstance(sub, nn.Linear):
            return sub.out_features
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.out_channels
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.num_features:
            return sub.num_features
        if isinstance(sub, (nn.LayerNorm, nn.GroupNorm)):
            return sub.normalized_shape[-1] if isinstance(sub, nn.LayerNorm) else sub.num_channels
        if isinstance(sub, nn.Embedding):
            return sub.embedding_dim
        if type(sub).__name__ == 'Conv1D' and isinstance(getattr(sub, 'nf', None), int):  # GPT-2's linear layers
            return sub.nf
    return None


def select_output(output: Any, index: int, where: str) -> torch.Tensor:
    """The tensor a hooked module produced: itself, element ``index`` of a tuple, or a model output's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, Sequence) and len(output) > index and isinstance(output[index], torch.Tensor):
        return output[index]
    raise TypeError(
        f'Module {where!r} output {type(output).__name__} has no tensor at index {index}. For attention '
        "probabilities, build the model with config output_attentions=True and attn_implementation='eager'."
    )


class FeatureCapture:
    """Forward hooks that keep the latest output of named modules while switched on.

    Args:
        modules (dict[str, nn.Module]): The modules to watch, by a name of the caller's choosing.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.enabled = False
        self.outputs: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._recorder(name)) for name, module in modules.items()
        ]

    def _recorder(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.enabled:
                self.outputs[name] = output

        return hook

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        """Remove every hook; the models are as they were before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


#: Where a ``Distillation``'s projections sit on the student during a fit (and in its checkpoints), suffixed by the
#: instance's name when it has one.
PROJECTIONS_NAME = 'distillation_projections'


def _check_projections_can_be_sharded_around(state: State, pairs: Sequence[int]) -> None:
    """Raise before anything trains where the learned projections of ``pairs`` cannot be kept out of FSDP."""
    config = state.fsdp_config
    if config is None or getattr(config, 'use_orig_params', True):
        return
    # Composer rebuilds the optimizer's parameter groups after sharding by parameter name, which needs
    # use_orig_params; the projections are trained in a group of their own.
    raise ValueError(
        f'feature_pairs: pairs {list(pairs)} need a learned projection (their feature widths differ), which under '
        "FSDP needs parallelism_config['fsdp']['use_orig_params'] = True (Composer's default). Set it, or pair "
        'modules of equal width (student_dim= / teacher_dim= equal).'
    )


def as_feature_pair(pair: Union[FeaturePair, Mapping[str, Any]], index: int) -> FeaturePair:
    """``pair`` as a :class:`FeaturePair` (a dict gives its fields); errors name ``feature_pairs[index]``."""
    if isinstance(pair, FeaturePair):
        return pair
    if isinstance(pair, Mapping):
        try:
            return FeaturePair(**pair)
        except TypeError as e:
            raise TypeError(f'feature_pairs[{index}]: {e}') from e
    raise TypeError(f'feature_pairs[{index}] must be a FeaturePair or a dict, got {type(pair).__name__}.')


class FeatureDistillation(Part):
    """The feature pairs of one ``Distillation``: their hooks, their learned projections and their loss terms.

    Through a fit: :meth:`init` (at ``Event.INIT``) finds the modules and makes the projections where widths
    differ, lending them to the student so that Composer's optimizer and checkpoints treat them as the student's
    own (DDP's reducer and FSDP's sharding leave them out; :meth:`reduce_gradients` averages them instead);
    :meth:`start` hooks the modules that will run; :meth:`capture` switches recording on for the batches the
    teachers run on; :meth:`losses` turns a microbatch's recorded features into loss terms;
    :meth:`end` removes the hooks and takes the projections back, so the student is exactly the model the user
    gave. As a part of a fit (:meth:`begin`), it switches recording on for the batches the plan distils, adds
    its terms to each distilling microbatch, and averages the projections' gradients after the backward passes.

    Args:
        pairs (Sequence[FeaturePair | dict]): The pairs.
        n_teachers (int): How many teachers there are (each pair names one by ``teacher_index``).
        name (str, optional): The owning ``Distillation``'s name: the projections sit on the student as
            ``distillation_projections_<name>`` (``distillation_projections`` without one).

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.features import FeatureDistillation, FeaturePair

            features = FeatureDistillation([FeaturePair(student='0', teacher='0')], n_teachers=1)
            assert len(features.pairs) == 1 and not features.projections
    """

    def __init__(
        self, pairs: Sequence[Union[FeaturePair, Mapping[str, Any]]], n_teachers: int, name: Optional[str] = None
    ):
        self.pairs = [as_feature_pair(pair, i) for i, pair in enumerate(pairs)]
        for i, pair in enumerate(self.pairs):
            if not 0 <= pair.teacher_index < n_teachers:
                raise ValueError(
                    f'feature_pairs[{i}].teacher_index={pair.teacher_index} but there are {n_teachers} teachers.'
                )
        self.projections_name = PROJECTIONS_NAME if name is None else f'{PROJECTIONS_NAME}_{name}'
        # Learnable maps from student to teacher feature widths, keyed by pair index; made by init().
        self.projections = nn.ModuleDict()
        self._student_modules: list[nn.Module] = []
        self._owner: Optional[nn.Module] = None
        self._captures: Optional[tuple[FeatureCapture, FeatureCapture]] = None

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def init(self, state: State, teachers: Sequence[nn.Module]) -> None:
        """Resolve the modules and make the projections while the optimizer can still take them in.

        ``Event.INIT`` comes after the optimizer is built but before a checkpoint is loaded, so projections added
        here are restored with the model's and the optimizer's state on resume.
        """
        self._student_modules = []
        for i, pair in enumerate(self.pairs):
            student_module = resolve_module(state.model, pair.student, role='student')
            teacher_module = resolve_module(teachers[pair.teacher_index], pair.teacher, role='teacher')
            self._student_modules.append(student_module)
            if not pair.projectable:
                continue
            widths = (
                pair.student_dim or output_width(student_module),
                pair.teacher_dim or output_width(teacher_module),
            )
            # An unreadable width (e.g. of an activation module) is taken to match; the first step checks it.
            if None not in widths and widths[0] != widths[1]:
                self.projections[str(i)] = nn.Linear(*widths, bias=False)
        if self.projections:
            _check_projections_can_be_sharded_around(state, sorted(int(key) for key in self.projections))
            state.device.module_to_device(self.projections)
            self._owner = state.model
            self._attach(True)
            # DDP must leave the projections alone: they run after the forward pass, where DDP's reducer does not
            # expect parameters (declaring them unused makes it count their gradients twice). Set before Composer
            # wraps the model; their gradients are averaged across processes by reduce_gradients() instead.
            ignored = getattr(state.model, '_ddp_params_and_buffers_to_ignore', [])
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                state.model,
                [*ignored, *(f'{self.projections_name}.{name}' for name, _ in self.projections.named_parameters())],
            )
            # FSDP likewise: Composer shards each child of the model except those marked `_fsdp_wrap = False`, and a
            # sharded projection would never be gathered (FSDP gathers parameters in the forward of the module it
            # wraps, and the projections run outside any). Left out, they stay whole on every process, and are
            # broadcast and averaged exactly as under DDP.
            if state.fsdp_config is not None:
                self.projections._fsdp_wrap = False
            optimizer = ensure_tuple(state.optimizers)[0]
            # Train the projections as the student's first group is trained (the same lr, weight decay, and keys
            # such as Composer's 'initial_lr' that a plain add_param_group would leave out).
            group = {k: v for k, v in optimizer.param_groups[0].items() if k != 'params'}
            optimizer.add_param_group({**group, 'params': list(self.projections.parameters())})

    def start(self, running_teachers: Sequence[nn.Module]) -> None:
        """Hook the student's modules and those of the teachers that will actually run (converted copies, where
        teacher options made them), and give every process rank zero's projections."""
        self._attach(True)  # again, for a second fit() with the same trainer
        if dist.get_world_size() > 1:
            # Each process made its own at Event.INIT, from its own seed; DDP, which would broadcast them, ignores
            # them, and FSDP leaves them out. After a resume they are already equal, and this changes nothing.
            for parameter in self.projections.parameters():
                dist.broadcast(parameter.data, src=0)
        self._remove_hooks()
        teacher_modules = {
            str(i): resolve_module(running_teachers[pair.teacher_index], pair.teacher, role='teacher')
            for i, pair in enumerate(self.pairs)
        }
        self._captures = (
            FeatureCapture({str(i): module for i, module in enumerate(self._student_modules)}),
            FeatureCapture(teacher_modules),
        )

    def begin(self, fit: FitContext) -> FeatureDistillation:
        """Start the fit's capture on the teachers as they run; this object is then the fit's part."""
        self.start(fit.running_teachers)
        return self

    @property
    def events(self) -> frozenset[Event]:  # type: ignore[override]
        events = {Event.BATCH_START, Event.BATCH_END}
        return frozenset(events | {Event.AFTER_TRAIN_BATCH} if self.reduces_gradients else events)

    def on_event(self, event: Event, fit: FitContext, logger: Logger) -> None:
        if event is Event.BATCH_START:
            self.capture(bool(fit.plan.active))
        elif event is Event.BATCH_END:
            self.capture(False)
        elif event is Event.AFTER_TRAIN_BATCH:
            self.reduce_gradients()

    def adjust(self, terms: LossTerms, fit: FitContext) -> None:
        terms.extra.update(self.losses(fit.state.batch, fit.plan.active, terms.usable))

    def capture(self, enabled: bool) -> None:
        """Switch recording on or off (and drop what was recorded)."""
        for capture in self._captures or ():
            capture.enabled = enabled
            capture.clear()

    def losses(
        self, batch: Any, active_teachers: Sequence[int], usable: Optional[torch.Tensor] = None
    ) -> dict[str, tuple[torch.Tensor, float]]:
        """The ``'feature_<i>'`` terms of this microbatch and their weights, for the pairs whose teacher ran.

        Args:
            batch (Any): The microbatch (its padding mask, if any, masks token features by position).
            active_teachers (Sequence[int]): The teachers that ran.
            usable (torch.Tensor, optional): The teachers' logits were free of NaN and +inf; the terms are zeroed
                where not.

        Returns:
            dict[str, tuple[torch.Tensor, float]]: ``{'feature_<i>': (loss, weight)}``.
        """
        assert self._captures is not None, 'FeatureDistillation.start() was not called'
        student_outputs, teacher_outputs = (capture.outputs for capture in self._captures)
        active = set(active_teachers)
        terms = {}
        for i, pair in enumerate(self.pairs):
            if pair.teacher_index not in active:
                continue
            key = str(i)
            if key not in student_outputs or key not in teacher_outputs:
                raise RuntimeError(
                    f'feature_pairs[{i}]: module {pair.student!r} (student) or {pair.teacher!r} (teacher) did not run '
                    'during the forward pass.'
                )
            student = select_output(student_outputs[key], pair.index, pair.student)
            teacher = select_output(teacher_outputs[key], pair.index, pair.teacher)
            if key in self.projections:
                dim = feature_dim(student)
                projection = self.projections[key]
                # Under mixed precision the features come out of autocast in half precision, while the projection
                # (like the optimizer's copy of any weight) is kept in full precision.
                features = student.movedim(dim, -1).to(projection.weight.dtype)
                student = projection(features).movedim(-1, dim)
            elif pair.projectable and student.shape != teacher.shape:
                raise ValueError(
                    f'feature_pairs[{i}]: student features {tuple(student.shape)} ({pair.student!r}) and teacher '
                    f'features {tuple(teacher.shape)} ({pair.teacher!r}) differ and no projection was made: pass '
                    'student_dim= and teacher_dim= (the feature widths) to have one learned.'
                )
            # Token features [B, S, D] and attention probabilities [B, H, S, S] are masked by query position.
            positions = (student.shape[0], student.shape[2]) if pair.loss == 'attention_probs' else student.shape[:-1]
            loss = pair.loss_fn(student, teacher, padding_mask(batch, tuple(positions)))
            terms[f'feature_{i}'] = (loss if usable is None else torch.where(usable, loss, 0.0), pair.weight)
        for capture in self._captures:
            capture.clear()  # this microbatch's features are used; the next records its own
        return terms

    @property
    def reduces_gradients(self) -> bool:
        """Whether :meth:`reduce_gradients` has work to do: learned projections on more than one process."""
        return bool(self.projections) and dist.get_world_size() > 1

    def reduce_gradients(self) -> None:
        """Average the projections' gradients across processes, as DDP averages the student's (after the batch's
        backward passes, before the optimizer step).

        A projection without a gradient (its teacher did not run this batch, or the window is closed) has none on
        every process, as those choices depend only on the seed and the step; it is left so, and the optimizer
        skips it, as it does on one process.
        """
        world_size = dist.get_world_size()
        for parameter in self.projections.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, reduce_operation='SUM')
                parameter.grad.div_(world_size)

    def end(self) -> None:
        """Remove the hooks and take the projections back from the student."""
        self._remove_hooks()
        self._attach(False)

    def _remove_hooks(self) -> None:
        for capture in self._captures or ():
            capture.remove()
        self._captures = None

    def _attach(self, attached: bool) -> None:
        """Lend the projections to the student during a fit (as ordinary parameters of the model, so Composer's
        optimizer, checkpoints under ``distillation_projections.``, resumption and DDP gradient averaging treat them
        like the student's own), and take them back when it ends."""
        if self._owner is None or not self.projections:
            return
        if attached:
            self._owner.add_module(self.projections_name, self.projections)
        elif hasattr(self._owner, self.projections_name):
            delattr(self._owner, self.projections_name)
