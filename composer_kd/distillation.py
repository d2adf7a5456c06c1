"""The ``Distillation`` algorithm: decides when teachers run and wires their distribution into the trainer's loss.

Everything it does in a fit is a part or a source (:mod:`composer_kd.parts`): it checks its arguments through
:mod:`composer_kd.options`, builds its parts and its source from its options when a fit starts, and hands each
the events it names. The names this module exported before they moved are still importable from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from composer_kd import options as checks
from composer_kd.cache import TeacherCache
from composer_kd.losses.objective import CombinedLoss, KDLossFn, combine_losses, distillation_loss, resolve_kd_loss
from composer_kd.models.outputs import Key, is_causal_lm
from composer_kd.models.teachers import (
    FrozenTeachers,
    TeacherInference,
    TeacherSpec,
    average_logits,
    resolve_teacher_logits_key,
    resolve_teachers,
    sample_teachers,
)
from composer_kd.parts.base import FitContext, TeacherKeys, end_teachers, log_key, start_teachers
from composer_kd.parts.features import FeatureDistillation, FeaturePair
from composer_kd.parts.fused import Fused, resolve_fused
from composer_kd.parts.guard import NonFiniteGuard
from composer_kd.parts.onpolicy import OnPolicy
from composer_kd.parts.plan import BatchPlan
from composer_kd.parts.registry import FitParts, alone_reason, part_kind
from composer_kd.schedules import ScheduleOrValue
from composer_kd.signal.distill import TeacherSignal
from composer_kd.window import TimeSpec, parse_window

__all__ = [
    'CombinedLoss',
    'Distillation',
    'KDLossFn',
    'average_logits',
    'combine_losses',
    'distillation_loss',
    'sample_teachers',
]

# The events every instance handles; each fit adds those its parts name.
_FIT_BOUNDARIES = frozenset({Event.INIT, Event.FIT_START, Event.FIT_END})


class Distillation(Algorithm):
    """Knowledge distillation: train the student to match frozen teachers as well as the labels.

    After the student's loss is computed for a microbatch, each active teacher runs on that same microbatch
    (in eval mode, under ``torch.no_grad()`` and the trainer's precision) and the loss becomes
    ``org_loss_weight * loss + kd_loss_weight * kd_loss_fn(student_logits, teacher_logits)``. ``state.loss``
    then holds ``'original'``, ``'kd'`` and ``'total'`` (plus the model's own named terms), so loggers show
    each term. Several named instances compose: each adds its own ``'kd/<name>'`` term (``name=`` below).

    Teachers are frozen for the fit and moved once to the trainer's device (under FSDP, sharded copies run: see
    ``TeacherInference(shard=...)``); they never enter the optimizer, the gradients or the student's checkpoints,
    their modes and ``requires_grad`` flags are restored when the fit ends, and evaluation never runs them.

    Args:
        teachers: A teacher (``nn.Module``, ``ComposerModel`` or Hugging Face ``PreTrainedModel``), a list of
            teachers, or a dict ``{checkpoint_path: model}`` whose weights are loaded at once from Composer
            checkpoints or ``state_dict`` files (local paths or any URI Composer reads). Or a
            :class:`~composer_kd.signal.TeacherSignal`: no teacher runs, and the distillation term comes from the
            teacher signal stored in each batch (top-k logits and tail mass written once by
            ``composer-kd teacher-signal``; see :mod:`composer_kd.signal`), with ``kd_loss_fn`` a forward KL.
        kd_loss_fn (Callable | str, optional): Loss between student and teacher logits, returning a scalar, or the
            name of one (``'kl'``, ``'js'``, ... as :func:`~composer_kd.losses.get_loss` takes them, with its
            default temperature). A loss whose ``forward`` takes ``labels`` (:class:`~composer_kd.DecoupledKD`)
            also receives each position's target class from the batch (see
            :func:`~composer_kd.models.outputs.target_labels`). Default: ``KLDivergence(temperature=4.0)``.
        org_loss_weight (float | Schedule, optional): Weight of the model's own loss, constant or following a
            :class:`~composer_kd.schedules.Schedule` over training. Default: ``1.0``.
        kd_loss_weight (float | Schedule, optional): Weight of the distillation loss, likewise. Default: ``1.0``.
        n_teachers_to_sample (int, optional): With several teachers, run only this many, drawn anew each step
            (reproducibly from the trainer's seed). Default: ``None``, every teacher; their logits are averaged.
        start (str | float | Time, optional): When distillation starts: a Composer time string (``'100ba'``,
            ``'2ep'``, ``'0.1dur'``) or a fraction of training. Default: ``0.0``.
        end (str | float | Time, optional): When it stops (exclusive). Default: ``None``, the end of training.
            Outside the window the teachers do not run and the loss is untouched. A fraction of training is not
            rounded to whole batches: a batch is inside the window if the part of training done before it is, so
            ``end='0.5dur'`` of a 5-batch run covers batches 0, 1 and 2.
        input_key (int | str | Callable, optional): Chooses the teachers' input from the batch, as
            ``composer.utils.batch_get`` does. Default: chosen by the teacher's kind (see
            :func:`~composer_kd.models.outputs.run_teacher`).
        student_logits_key (int | str | Callable, optional): Chooses the logits in the student's output.
            Default: a tensor output, its ``'logits'`` entry, or its first element.
        teacher_logits_key (int | str | Callable, optional): The same for the teachers' outputs. Default:
            ``student_logits_key``, except that a teacher returning a bare tensor gives that tensor (so a
            single-task teacher can teach one head of a multi-head student chosen by ``student_logits_key``).
        causal_lm (bool, optional): Whether token logits at position ``i`` predict token ``i + 1``, which shifts
            the mask of valid positions (see :func:`~composer_kd.models.outputs.token_mask`). Default: ``None``,
            detected from the student (a Hugging Face model that can generate and is not encoder-decoder).
        temperature (float | Schedule, optional): Sets ``kd_loss_fn.temperature`` at every step, e.g. a
            :class:`~composer_kd.LinearSchedule` from soft to sharp (progressive distillation). Default: ``None``,
            the loss keeps its own.
        feature_pairs (Sequence[FeaturePair | dict], optional): Intermediate modules to match, named by path
            (see :class:`~composer_kd.parts.features.FeaturePair`); each adds a ``'feature_<i>'`` term. Where widths
            differ, a learned projection is trained with the student's optimizer and saved in its checkpoints (as
            ``distillation_projections.*``), and detached from the student when the fit ends. Default: none.
        on_nonfinite_teacher (str, optional): When a teacher's logits hold NaN or +inf, ``'raise'`` an error
            naming the step, or ``'skip'`` the microbatch's distillation terms (the model's own loss still trains
            it), counted in ``distillation/skipped_microbatches``. No NaN reaches a gradient; the check costs one
            host synchronization per batch (see :class:`~composer_kd.parts.guard.NonFiniteGuard`). Default:
            ``'raise'``.
        teacher_inference (TeacherInference, optional): Opt-in teacher speed-ups: bf16 weights, channels-last,
            ``torch.compile`` (see :class:`~composer_kd.models.teachers.TeacherInference`). Default: none.
        teacher_cache (TeacherCache, optional): Record the teachers' averaged logits per training example the
            first time it is distilled and read them back afterwards, so later epochs skip the teachers (see
            :class:`~composer_kd.cache.TeacherCache`). Default: none.
        name (str, optional): Names this instance's loss terms ``'kd/<name>'`` (and ``'feature_<i>/<name>'``) and
            logged values ``distillation/<name>/...``, so that several instances, each with its own settings, share
            one trainer (e.g. one per task of a multi-task student); the model's own loss enters the total once,
            weighted by the product of their ``org_loss_weight`` (see :func:`combine_losses`). Letters, digits,
            ``_`` and ``-``, unique within a trainer. Default: ``None``, the terms are ``'kd'`` and ``'feature_<i>'``.
        on_policy (OnPolicy, optional): Train a causal language model on continuations of the batch's prompts
            that it (or the first teacher) generates, for a share of the batches (see
            :class:`~composer_kd.parts.onpolicy.OnPolicy`). Default: none, every batch is the dataset's.
        fused (bool | Fused, optional): Compute a language model's cross-entropy and distillation loss from the
            final hidden states and output weights a chunk of tokens at a time, never making ``[tokens,
            vocabulary]`` logits in training (``True`` or :class:`~composer_kd.parts.fused.Fused` options; see
            :mod:`composer_kd.parts.fused`). Default: ``None``, off.

    Which options combine is one table, :data:`composer_kd.options.CONFLICTS`; a pair it lists is refused here.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import DataLoader, TensorDataset
            from composer import Trainer
            from composer.models import ComposerClassifier
            from composer_kd import Distillation, KLDivergence

            data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
            teacher = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
            student = ComposerClassifier(torch.nn.Linear(8, 3), num_classes=3)
            trainer = Trainer(
                model=student,
                train_dataloader=DataLoader(data, batch_size=8),
                max_duration='1ep',
                algorithms=[Distillation(teacher, KLDivergence(temperature=4.0), 0.1, 0.9)],
            )
            trainer.fit()
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Distillation:
        # Python's own message for a misspelled keyword names no alternative; this one does, before __init__ runs.
        checks.refuse_unknown_keywords('Distillation', kwargs, cls.__signature__.parameters)
        return super().__new__(cls)

    def __init__(
        self,
        teachers: TeacherSpec,
        kd_loss_fn: Optional[KDLossFn] = None,
        org_loss_weight: float = 1.0,
        kd_loss_weight: float = 1.0,
        n_teachers_to_sample: Optional[int] = None,
        start: TimeSpec = 0.0,
        end: Optional[TimeSpec] = None,
        input_key: Optional[Key] = None,
        student_logits_key: Optional[Key] = None,
        teacher_logits_key: Optional[Key] = None,
        causal_lm: Optional[bool] = None,
        temperature: Optional[ScheduleOrValue] = None,
        feature_pairs: Sequence[Union[FeaturePair, Mapping[str, Any]]] = (),
        on_nonfinite_teacher: str = 'raise',
        teacher_inference: Optional[TeacherInference] = None,
        teacher_cache: Optional[TeacherCache] = None,
        name: Optional[str] = None,
        on_policy: Optional[OnPolicy] = None,
        fused: Union[None, bool, Fused] = None,
    ):
        checks.check_name(name)
        checks.check_weights(org_loss_weight, kd_loss_weight)
        self.kd_loss_fn = resolve_kd_loss(kd_loss_fn)
        checks.check_temperature(temperature, self.kd_loss_fn)
        self.start, self.end = parse_window(start, end)
        checks.check_type('teacher_cache', teacher_cache, TeacherCache)
        checks.check_type('on_policy', on_policy, OnPolicy)
        self.fused = resolve_fused(fused)
        checks.refuse_conflicts(
            checks.given_options(
                teachers=teachers,
                n_teachers_to_sample=n_teachers_to_sample,
                feature_pairs=feature_pairs,
                teacher_cache=teacher_cache,
                on_policy=on_policy,
                fused=self.fused,
                on_nonfinite_teacher=on_nonfinite_teacher,
                teacher_inference=teacher_inference,
                student_logits_key=student_logits_key,
            )
        )
        self.teacher_signal = teachers if isinstance(teachers, TeacherSignal) else None
        # Checkpoints are loaded here, so that a bad path or mismatched weights fail before training starts.
        self.teachers = FrozenTeachers([] if self.teacher_signal is not None else resolve_teachers(teachers))
        checks.check_n_teachers_to_sample(n_teachers_to_sample, len(self.teachers.modules))
        self.name = name
        self.org_loss_weight, self.kd_loss_weight, self.temperature = org_loss_weight, kd_loss_weight, temperature
        self.n_teachers_to_sample = n_teachers_to_sample
        self.input_key, self.student_logits_key, self.causal_lm = input_key, student_logits_key, causal_lm
        self.teacher_logits_key, self._bare_teacher_tensor_is_logits = resolve_teacher_logits_key(
            student_logits_key, teacher_logits_key
        )
        self.on_nonfinite_teacher = on_nonfinite_teacher
        self._guard = NonFiniteGuard(on_nonfinite_teacher, log_key=log_key(name, 'skipped_microbatches'))
        self.teacher_inference = teacher_inference or TeacherInference()
        self.teacher_cache, self.on_policy = teacher_cache, on_policy
        self.features = FeatureDistillation(feature_pairs, len(self.teachers.modules), name=name)
        for option in self._options().values():
            part_kind(option).check(option, self.kd_loss_fn)
        # Set when a fit starts: what its parts share, and its parts.
        self._fit: Optional[FitContext] = None
        self._parts: Optional[FitParts] = None
        self._events = _FIT_BOUNDARIES

    def _options(self) -> dict[str, Any]:
        """The options that become parts of a fit, by argument name, in the order their parts act."""
        options = {
            'teacher_cache': self.teacher_cache,
            'on_nonfinite_teacher': self._guard,
            'feature_pairs': self.features,
            'on_policy': self.on_policy,
            'fused': self.fused,
            'teachers': self.teacher_signal,
        }
        return {argument: option for argument, option in options.items() if option is not None}

    def __str__(self) -> str:
        # Composer's engine formats this into a trace key every time the algorithm runs: keep it cheap. Within one
        # trainer it is unique, as names are.
        return 'Distillation' if self.name is None else f'Distillation(name={self.name!r})'

    def __repr__(self) -> str:
        # Kept short and free of the teachers' weights: Composer stores this string in every checkpoint.
        shown = [f'name={self.name!r}'] if self.name is not None else []
        shown += [f'n_teachers={len(self.teachers.modules)}', f'kd_loss_fn={self.kd_loss_fn!r}']
        for key in ('org_loss_weight', 'kd_loss_weight', 'temperature', 'n_teachers_to_sample', 'start', 'end'):
            shown.append(f'{key}={getattr(self, key)}')
        for key in ('teacher_cache', 'on_policy', 'teacher_signal', 'fused'):
            shown += [f'{key}={getattr(self, key)!r}'] if getattr(self, key) is not None else []
        return f'Distillation({", ".join(shown)})'

    @property
    def teacher_modules(self) -> list[nn.Module]:
        """The teachers, as given (with checkpoint weights loaded)."""
        return self.teachers.modules

    @property
    def feature_pairs(self) -> list[FeaturePair]:
        """The feature pairs, as :class:`~composer_kd.parts.features.FeaturePair` objects."""
        return self.features.pairs

    @property
    def projections(self) -> nn.ModuleDict:
        """The learned feature projections, keyed by pair index (empty where widths match)."""
        return self.features.projections

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for argument, option in self._options().items():
            if hasattr(option, 'state_dict'):
                state[argument] = option.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for argument, option in self._options().items():
            if hasattr(option, 'load_state_dict') and argument in state:
                option.load_state_dict(state[argument])

    def match(self, event: Event, state: State) -> bool:
        # Identity tests and one set lookup: match runs for every event of every step, and equality of
        # Composer's events (a StringEnum) costs a Python call per comparison.
        if event is Event.AFTER_LOSS:
            return self._fit is not None and bool(self._fit.plan.active)
        return event in self._events

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.AFTER_LOSS:
            state.loss = self._parts.loss(self._fit)  # type: ignore[union-attr,arg-type]
            return
        if event is Event.INIT:
            self._init(state)
        elif event is Event.FIT_START:
            self._fit_start(state, logger)
        if self._parts is not None:
            self._parts.on_event(event, self._fit, logger)  # type: ignore[arg-type]
        if event is Event.FIT_END:
            self._fit_end()

    def _init(self, state: State) -> None:
        for other in state.algorithms:
            if other is self or not isinstance(other, Distillation):
                continue
            reason = alone_reason(self._options().values()) or alone_reason(other._options().values())
            if reason:
                raise ValueError(f'A Distillation with {reason}.')
            if other.name == self.name:
                raise ValueError(
                    f'Two Distillation algorithms in one Trainer are both named {self.name!r}: each writes its loss '
                    "term as 'kd/<name>' ('kd' without a name), so give each a distinct name=."
                )
        for option in self._options().values():
            part_kind(option).init(option, state, self.teachers.modules)

    def _fit_start(self, state: State, logger: Logger) -> None:
        runners = start_teachers(state, self.teachers, self.teacher_inference)
        plan = BatchPlan(
            state,
            n_sources=1 if self.teacher_signal is not None else len(runners),
            n_teachers_to_sample=self.n_teachers_to_sample,
            start=self.start,
            end=self.end,
            org_loss_weight=self.org_loss_weight,
            kd_loss_weight=self.kd_loss_weight,
            temperature=self.temperature,
        )
        keys = TeacherKeys(
            self.input_key, self.student_logits_key, self.teacher_logits_key, self._bare_teacher_tensor_is_logits
        )
        causal = self.causal_lm if self.causal_lm is not None else is_causal_lm(state.model)
        self._fit = fit = FitContext(
            state, runners, self.kd_loss_fn, keys, causal, plan, self._guard, self.teacher_inference, self.name, self
        )
        fit.signal = self.teacher_signal
        self._parts = FitParts(fit, list(self._options().values()))
        plan.begin(fit, logger)
        self._events = _FIT_BOUNDARIES | self._parts.events

    def _fit_end(self) -> None:
        if self._parts is not None:
            self._parts.end()
        end_teachers(self.teachers, self._fit.runners if self._fit is not None else [])
        self._fit, self._parts, self._events = None, None, _FIT_BOUNDARIES


# help(), editors and the API reference show the constructor's parameters rather than __new__'s catch-all.
_INIT_SIGNATURE = inspect.signature(Distillation.__init__)
Distillation.__signature__ = _INIT_SIGNATURE.replace(parameters=list(_INIT_SIGNATURE.parameters.values())[1:])
