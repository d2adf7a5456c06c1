"""The ``Distillation`` algorithm: decides when teachers run and wires their logits into the trainer's loss.

What it is made of lives in modules of their own (see ``docs/architecture.md``): the objective in
:mod:`composer_kd.losses.objective`, running teachers in :mod:`composer_kd.models.teachers`, feature pairs in
:mod:`composer_kd.parts.features`, the NaN/+inf guard in :mod:`composer_kd.parts.guard`, the teacher cache in
:mod:`composer_kd.cache`. The names this module exported before they moved are still importable from it.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from composer_kd.cache import CachedFit, TeacherCache
from composer_kd.losses import LOSSES, KLDivergence, get_loss
from composer_kd.losses.objective import (
    CombinedLoss,
    KDLossFn,
    combine_losses,
    distillation_loss,
    takes_labels,
    takes_mask,
)
from composer_kd.models.outputs import Key, extract_logits, is_causal_lm, target_labels, token_mask
from composer_kd.models.teachers import (
    FrozenTeachers,
    TeacherInference,
    TeacherRunner,
    TeacherSpec,
    average_logits,
    check_teachers_can_run,
    resolve_teacher_logits_key,
    resolve_teachers,
    sample_teachers,
    teacher_logits,
)
from composer_kd.parts.features import FeatureDistillation, FeaturePair
from composer_kd.parts.fused import Fused, FusedFit, check_fused_settings, resolve_fused
from composer_kd.parts.guard import NonFiniteGuard
from composer_kd.parts.onpolicy import OnPolicy, OnPolicyFit
from composer_kd.schedules import Schedule, ScheduleOrValue, value_at
from composer_kd.signal.distill import TeacherSignal
from composer_kd.window import TimeSpec, TrainerTime, parse_time, reached, to_trainer_time

__all__ = [
    'CombinedLoss',
    'Distillation',
    'KDLossFn',
    'average_logits',
    'combine_losses',
    'distillation_loss',
    'sample_teachers',
]


def _check_scheduled(name: str, value: ScheduleOrValue, minimum: float, inclusive: bool) -> None:
    """Refuse a constant or a schedule that goes below ``minimum`` (or to it, unless ``inclusive``)."""
    low = value.bounds[0] if isinstance(value, Schedule) else value
    valid = (
        isinstance(low, (int, float)) and not isinstance(low, bool) and (low >= minimum if inclusive else low > minimum)
    )
    if not valid:
        relation = '>=' if inclusive else '>'
        raise ValueError(f'{name} must be a number {relation} {minimum:g} (or a schedule staying so), got {value!r}.')


def _largest(value: ScheduleOrValue) -> float:
    return value.bounds[1] if isinstance(value, Schedule) else value


def _has_no_batches(state: State) -> bool:
    loader = state.train_dataloader
    if state.dataloader_len is not None and int(state.dataloader_len) == 0:
        return True
    return hasattr(loader, '__len__') and len(loader) == 0  # type: ignore[arg-type]


_NAME = re.compile(r'[A-Za-z0-9_-]+')
# The events every instance handles; each fit adds those its settings need (see ``Distillation._fit_start``).
_FIT_BOUNDARIES = frozenset({Event.INIT, Event.FIT_START, Event.FIT_END})


class Distillation(Algorithm):
    """Knowledge distillation: train the student to match frozen teachers as well as the labels.

    After the student's loss is computed for a microbatch, each active teacher runs on that same microbatch
    (in eval mode, under ``torch.no_grad()`` and the trainer's precision) and the loss becomes
    ``org_loss_weight * loss + kd_loss_weight * kd_loss_fn(student_logits, teacher_logits)``. ``state.loss``
    then holds ``'original'``, ``'kd'`` and ``'total'`` (plus the model's own named terms), so loggers show
    each term. Several named instances compose: each adds its own ``'kd/<name>'`` term (``name=`` below).

    Teachers are frozen for the whole fit and moved once to the trainer's device when it starts; they never
    enter the optimizer, the gradients or the student's checkpoints, and their original modes and
    ``requires_grad`` flags are restored when the fit ends. Evaluation and prediction never run them.

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
        causal_lm (bool, optional): Whether token logits at position ``i`` predict token ``i + 1`` (decoder-only
            language models), which shifts the mask of valid positions by one (see
            :func:`~composer_kd.models.outputs.token_mask`). Default: ``None``, detected from the student (a Hugging
            Face model that can generate and is not encoder-decoder).
        temperature (float | Schedule, optional): Sets ``kd_loss_fn.temperature`` at every step, e.g. a
            :class:`~composer_kd.LinearSchedule` from soft to sharp (progressive distillation). Default: ``None``,
            the loss keeps its own.
        feature_pairs (Sequence[FeaturePair | dict], optional): Intermediate modules to match, named by path
            (see :class:`~composer_kd.parts.features.FeaturePair`); each adds a ``'feature_<i>'`` term to the loss.
            Where widths differ, a learnable projection owned by this algorithm is trained with the student's
            optimizer and saved in training checkpoints (as ``distillation_projections.*``), but is detached from
            the student when the fit ends. Default: none.
        on_nonfinite_teacher (str, optional): What to do when a teacher's logits hold NaN or +inf: ``'raise'``
            an error naming the step, or ``'skip'`` the distillation terms of that microbatch (the model's own
            loss still trains it) and count it in ``distillation/skipped_microbatches``. Either way no NaN reaches
            a gradient, and the check costs one host synchronization per batch, after the backward passes.
            Default: ``'raise'``.
        teacher_inference (TeacherInference, optional): Opt-in teacher speed-ups: weights kept in bf16,
            channels-last layout, ``torch.compile`` (see :class:`~composer_kd.models.teachers.TeacherInference`; the
            benchmarks measure each). Default: none.
        teacher_cache (TeacherCache, optional): Record the teachers' averaged logits per training example the
            first time it is distilled and read them back afterwards, so later epochs skip the teachers (see
            :class:`~composer_kd.cache.TeacherCache`; the training dataset is wrapped in
            :class:`~composer_kd.cache.IndexedDataset`). Not with ``n_teachers_to_sample`` (a sampled subset's
            average differs from step to step) or ``feature_pairs`` (they need the live teacher). Default: none.
        name (str, optional): Names this instance's loss terms ``'kd/<name>'`` (and ``'feature_<i>/<name>'``) and
            its logged values ``distillation/<name>/...``, so that several instances can share one trainer, e.g.
            one per task of a multi-task student, each with its own teachers, logits keys, weights and
            temperature. The model's own loss then enters the total once, weighted by the product of the
            instances' ``org_loss_weight`` (see :func:`combine_losses`; leave it at 1.0 on all but one).
            Letters, digits, ``_`` and ``-``. Default: ``None``, the terms are ``'kd'`` and ``'feature_<i>'``; two
            instances of one trainer with the same name are refused when the trainer is built.
        on_policy (OnPolicy, optional): Train a causal language model on continuations of the batch's prompts that it
            generates itself (or, with ``source='teacher'``, the first teacher generates), for a share of the batches
            (see :class:`~composer_kd.parts.onpolicy.OnPolicy`). Not with ``teacher_cache`` (generated sequences are new
            every time). Default: none, every batch is the dataset's.
        fused (bool | Fused, optional): Compute the student's cross-entropy and the distillation loss of a language
            model from both models' final hidden states and output weights, a chunk of tokens at a time, so that
            neither model's ``[tokens, vocabulary]`` logits are ever made during training (see
            :mod:`composer_kd.parts.fused` and ``docs/fused.md``): ``True`` or
            :class:`~composer_kd.parts.fused.Fused` options. For Hugging Face causal and masked language
            models (and llm-foundry's), with the losses of :data:`~composer_kd.losses.fused.FUSED_LOSSES`; evaluation
            still sees normal logits. Default: ``None``, off.

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
        known = cls.__signature__.parameters
        for keyword in kwargs:
            if keyword not in known:
                nearest = difflib.get_close_matches(keyword, list(known), n=1)
                hint = f"; did you mean '{nearest[0]}'?" if nearest else ''
                raise TypeError(f"Distillation() got an unexpected keyword argument '{keyword}'{hint}")
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
        if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise ValueError(f'name must be a non-empty string of letters, digits, _ and -, got {name!r}.')
        self.name = name
        for argument, weight in (('org_loss_weight', org_loss_weight), ('kd_loss_weight', kd_loss_weight)):
            _check_scheduled(argument, weight, minimum=0.0, inclusive=True)
        if _largest(org_loss_weight) == 0 and _largest(kd_loss_weight) == 0:
            raise ValueError('org_loss_weight and kd_loss_weight are both 0: nothing would be trained.')
        if isinstance(kd_loss_fn, str):
            kd_loss_fn = get_loss(kd_loss_fn)  # a name, as recipes give it; unknown names list the known ones
        if kd_loss_fn is not None and not callable(kd_loss_fn):
            raise TypeError(
                f'kd_loss_fn must be a loss name (one of {sorted(LOSSES)}) or a callable (student_logits, '
                f'teacher_logits) -> scalar, got {type(kd_loss_fn).__name__}.'
            )
        self.kd_loss_fn = kd_loss_fn if kd_loss_fn is not None else KLDivergence(temperature=4.0)
        if temperature is not None:
            _check_scheduled('temperature', temperature, minimum=0.0, inclusive=False)
            if not hasattr(self.kd_loss_fn, 'temperature'):
                raise TypeError(
                    f'temperature was given but kd_loss_fn {type(self.kd_loss_fn).__name__} has no `temperature` '
                    'attribute to set.'
                )
        self.start = parse_time(start, 'start')
        self.end = None if end is None else parse_time(end, 'end')
        if self.end is not None and self.end.unit == self.start.unit and self.end.value <= self.start.value:
            raise ValueError(f'end={end!r} must come after start={start!r}.')

        self.teacher_signal = teachers if isinstance(teachers, TeacherSignal) else None
        if self.teacher_signal is not None:
            self._check_signal_options(n_teachers_to_sample, feature_pairs, teacher_cache, on_policy, fused)
        # Checkpoints are loaded here, so that a bad path or mismatched weights fail before training starts.
        self.teachers = FrozenTeachers([] if self.teacher_signal is not None else resolve_teachers(teachers))
        n_teachers = len(self.teachers.modules)
        if n_teachers_to_sample is not None and not (
            isinstance(n_teachers_to_sample, int) and 1 <= n_teachers_to_sample <= n_teachers
        ):
            raise ValueError(
                f'n_teachers_to_sample must be an integer between 1 and the number of teachers ({n_teachers}), '
                f'got {n_teachers_to_sample!r}.'
            )

        self.org_loss_weight = org_loss_weight
        self.kd_loss_weight = kd_loss_weight
        self.temperature = temperature
        self.n_teachers_to_sample = n_teachers_to_sample
        self.input_key = input_key
        self.student_logits_key = student_logits_key
        self.teacher_logits_key, self._bare_teacher_tensor_is_logits = resolve_teacher_logits_key(
            student_logits_key, teacher_logits_key
        )
        self.causal_lm = causal_lm
        self.on_nonfinite_teacher = on_nonfinite_teacher
        self._guard = NonFiniteGuard(on_nonfinite_teacher, log_key=self._log_key('skipped_microbatches'))
        self.teacher_inference = teacher_inference or TeacherInference()
        if self.teacher_inference.compile and feature_pairs:
            raise ValueError(
                'teacher_inference compile cannot be combined with feature_pairs: hooks inside a compiled '
                'teacher are not reliable.'
            )
        if teacher_cache is not None:
            if not isinstance(teacher_cache, TeacherCache):
                raise TypeError(f'teacher_cache must be a TeacherCache, got {type(teacher_cache).__name__}.')
            if n_teachers_to_sample is not None:
                raise ValueError(
                    'teacher_cache cannot be combined with n_teachers_to_sample: the cache holds the average of every '
                    "teacher, which is not what a step's sampled teachers give. Drop one of the two."
                )
            if feature_pairs:
                raise ValueError(
                    'teacher_cache cannot be combined with feature_pairs: feature distillation needs the live '
                    "teacher's intermediate outputs at every step. Drop one of the two."
                )
        self.teacher_cache = teacher_cache
        if on_policy is not None:
            if not isinstance(on_policy, OnPolicy):
                raise TypeError(f'on_policy must be an OnPolicy, got {type(on_policy).__name__}.')
            if teacher_cache is not None:
                raise ValueError(
                    'on_policy cannot be combined with teacher_cache: the cache holds teacher logits per dataset '
                    'example, and generated sequences are new at every step. Drop one of the two.'
                )
        self.on_policy = on_policy
        self._on_policy_fit: Optional[OnPolicyFit] = None
        self.fused = resolve_fused(fused)
        check_fused_settings(
            self.fused,
            self.kd_loss_fn,
            feature_pairs=feature_pairs,
            teacher_cache=teacher_cache,
            on_policy=on_policy,
            on_nonfinite_teacher=on_nonfinite_teacher,
            teacher_compiled=bool(self.teacher_inference.compile),
            student_logits_key=student_logits_key,
        )
        self._fused_fit: Optional[FusedFit] = None
        self.features = FeatureDistillation(feature_pairs, n_teachers, name=name)

        # Set at fit start: the teachers as they run, the cache's state for the fit, the window in the trainer's
        # units, and the events to handle. Set each batch: the teachers that run, and the weights in force.
        self._runners: list[TeacherRunner] = []
        self._cached_fit: Optional[CachedFit] = None
        self._start: Optional[TrainerTime] = None
        self._end: Optional[TrainerTime] = None
        self._active_teachers: list[int] = []
        self._causal = False
        self._loss_takes_mask = False
        self._loss_takes_labels = False
        self._weights = (0.0, 0.0)
        self._events = _FIT_BOUNDARIES
        self._signal_checked = False

    def _check_signal_options(self, n_teachers_to_sample, feature_pairs, teacher_cache, on_policy, fused) -> None:
        if not isinstance(self.kd_loss_fn, KLDivergence):
            raise TypeError(
                'teachers=TeacherSignal(...) computes a forward KL from the stored top-k logits, so kd_loss_fn must '
                f'be a KLDivergence (or the name "kl"), got {type(self.kd_loss_fn).__name__}.'
            )
        live = 'it needs live teachers, and a stored signal has none'
        given = {
            'n_teachers_to_sample': (n_teachers_to_sample is not None, live),
            'feature_pairs': (bool(feature_pairs), live),
            'teacher_cache': (teacher_cache is not None, live),
            'on_policy': (on_policy is not None, live),
            'fused': (fused not in (None, False), 'the fused loop does not compute from a stored top-k signal'),
        }
        for argument, (present, why) in given.items():
            if present:
                raise ValueError(f'{argument} cannot be combined with teachers=TeacherSignal(...): {why}.')

    @property
    def _n_sources(self) -> int:
        # A stored signal counts as one teacher for the window and the events: it is "active" or not.
        return 1 if self.teacher_signal is not None else len(self.teachers.modules)

    def __str__(self) -> str:
        # Composer's engine formats this into a trace key every time the algorithm runs: keep it cheap. Within one
        # trainer it is unique, as names are.
        return 'Distillation' if self.name is None else f'Distillation(name={self.name!r})'

    def __repr__(self) -> str:
        # Kept short and free of the teachers' weights: Composer stores this string in every checkpoint.
        named = '' if self.name is None else f'name={self.name!r}, '
        return (
            f'Distillation({named}n_teachers={len(self.teachers.modules)}, kd_loss_fn={self.kd_loss_fn!r}, '
            f'org_loss_weight={self.org_loss_weight}, kd_loss_weight={self.kd_loss_weight}, '
            f'temperature={self.temperature}, n_teachers_to_sample={self.n_teachers_to_sample}, '
            f'start={self.start}, end={self.end}'
            + ('' if self.teacher_cache is None else f', teacher_cache={self.teacher_cache!r}')
            + ('' if self.on_policy is None else f', on_policy={self.on_policy!r}')
            + ('' if self.teacher_signal is None else f', teacher_signal={self.teacher_signal!r}')
            + ('' if self.fused is None else f', fused={self.fused!r}')
            + ')'
        )

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
        if self.teacher_cache is not None:
            state['teacher_cache'] = self.teacher_cache.state_dict()
        if self.on_policy is not None:
            state['on_policy'] = self.on_policy.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.teacher_cache is not None and 'teacher_cache' in state:
            self.teacher_cache.load_state_dict(state['teacher_cache'])
        if self.on_policy is not None and 'on_policy' in state:
            self.on_policy.load_state_dict(state['on_policy'])

    def match(self, event: Event, state: State) -> bool:
        # Identity tests and one set lookup: match runs for every event of every step, and equality of
        # Composer's events (a StringEnum) costs a Python call per comparison.
        if event is Event.AFTER_LOSS:
            return bool(self._active_teachers)
        if event is self._guard.check_event and self._guard.pending:
            return True
        return event in self._events

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.AFTER_LOSS:
            self._distill(state)
            return
        if event is Event.BEFORE_FORWARD and self._fused_fit is not None:
            self._fused_fit.before_forward(distilling=bool(self._active_teachers))
            return
        if event is OnPolicyFit.EVENT and self._on_policy_fit is not None:
            self._on_policy_fit.prepare_batch(state, logger, distilling=bool(self._teachers_for_batch(state)))
            return
        if self._cached_fit is not None and event in CachedFit.EVENTS:
            self._cached_fit.on_event(event, state)
        if event is self._guard.check_event:
            self._guard.settle(state, logger)
        if event is Event.BATCH_START:
            self._active_teachers = self._teachers_for_batch(state)
            if self._active_teachers:
                self._set_scheduled_values(state, logger)
            self.features.capture(bool(self._active_teachers))
        elif event is Event.AFTER_TRAIN_BATCH:
            if self.features.reduces_gradients:
                self.features.reduce_gradients()
        elif event is Event.BATCH_END:
            self.features.capture(False)
        elif event is Event.INIT:
            self._check_unique_name(state)
            self.features.init(state, self.teachers.modules)
            if self.on_policy is not None:
                self.on_policy.check(state, self.teachers.modules)
        elif event is Event.FIT_START:
            self._fit_start(state, logger)
        elif event is Event.FIT_END:
            self._fit_end()

    def _fit_start(self, state: State, logger: Logger) -> None:
        student_params = {id(p) for p in state.model.parameters()}
        for i, teacher in enumerate(self.teachers.modules):
            if any(id(p) in student_params for p in teacher.parameters()):
                raise ValueError(
                    f'teachers[{i}] shares parameters with the student being trained; a teacher must be a '
                    'separate, fixed model (copy it with copy.deepcopy if it starts from the same weights).'
                )
        check_teachers_can_run(self.teachers.modules, state.model, converts_dtype=bool(self.teacher_inference.dtype))
        if _has_no_batches(state):
            raise ValueError(
                'The training dataloader is empty (0 batches): there is nothing to distil on, and the training loop '
                'would wait for a batch forever. Check the dataset and the batch size (drop_last=True with fewer '
                'examples than one batch gives no batch).'
            )
        self.teachers.freeze()
        for teacher in self.teachers.modules:
            state.device.module_to_device(teacher)
        self._runners = [TeacherRunner(teacher, self.teacher_inference) for teacher in self.teachers.modules]
        running = [runner.prepare() for runner in self._runners]
        if self.features:
            self.features.start(running)
        self._causal = self.causal_lm if self.causal_lm is not None else is_causal_lm(state.model)
        self._loss_takes_mask = takes_mask(self.kd_loss_fn)
        self._loss_takes_labels = takes_labels(self.kd_loss_fn)
        if self.teacher_cache is not None:
            self._cached_fit = self.teacher_cache.start(
                state,
                self.teachers.modules,
                input_key=self.input_key,
                logits_key=self.teacher_logits_key,
                teacher_dtype=self.teacher_inference.dtype,
                algorithms=[a for a in state.algorithms if a is not self],
            )
        self._start = to_trainer_time(self.start, state)
        self._end = None if self.end is None else to_trainer_time(self.end, state)
        if self.on_policy is not None:
            self._on_policy_fit = self.on_policy.start(
                state, [r.module for r in self._runners], self._log_key('').rstrip('/')
            )
        # Only the events these settings need: every event an algorithm handles costs Composer's engine a trace
        # and a log call, which on a GPU at millisecond steps is a visible share of the step.
        events = set(_FIT_BOUNDARIES)
        if self._varies_per_batch():
            events.add(Event.BATCH_START)
        else:
            self._active_teachers = list(range(self._n_sources))
            self._set_scheduled_values(state, logger)
        if self.features:
            events.add(Event.BATCH_END)
        if self.features.reduces_gradients:
            events.add(Event.AFTER_TRAIN_BATCH)
        if self._cached_fit is not None:
            events |= CachedFit.EVENTS
        if self._on_policy_fit is not None:
            events.add(OnPolicyFit.EVENT)
        if self.fused is not None:
            self._fused_fit = FusedFit(self.fused, state, self._runners, self.kd_loss_fn, name=self.name)
            events.add(Event.BEFORE_FORWARD)
        self._events = frozenset(events)

    def _fit_end(self) -> None:
        self._signal_checked = False
        if self._fused_fit is not None:
            self._fused_fit.end()
            self._fused_fit = None
        self._cached_fit = None
        self._on_policy_fit = None
        self._active_teachers = []
        self._events = _FIT_BOUNDARIES
        self._guard.reset()
        self.features.end()
        for runner in self._runners:
            runner.release()
        self._runners = []
        self.teachers.restore()

    def _varies_per_batch(self) -> bool:
        """Whether the teachers that run or the values in force can change from one batch to the next."""
        scheduled = (self.org_loss_weight, self.kd_loss_weight, self.temperature)
        return (
            bool(self.features)  # feature capture is switched on and off around every batch
            or self.n_teachers_to_sample is not None
            or self.start.value != 0
            or self.end is not None
            or any(isinstance(value, Schedule) for value in scheduled)
        )

    def _check_unique_name(self, state: State) -> None:
        for other in state.algorithms:
            if other is not self and isinstance(other, Distillation) and (self.fused or other.fused):
                raise ValueError(
                    'A Distillation with fused=... must be the only Distillation of its Trainer: it computes the '
                    "student's loss itself and the student makes no logits for another instance to read."
                )
            if other is not self and isinstance(other, Distillation) and other.name == self.name:
                raise ValueError(
                    f'Two Distillation algorithms in one Trainer are both named {self.name!r}: each writes its loss '
                    "term as 'kd/<name>' ('kd' without a name), so give each a distinct name=."
                )

    def _log_key(self, key: str) -> str:
        return f'distillation/{key}' if self.name is None else f'distillation/{self.name}/{key}'

    def _teachers_for_batch(self, state: State) -> list[int]:
        """Indices of the teachers that run this batch: none outside the window, else all or a sample."""
        if not reached(self._start, state) or reached(self._end, state):
            return []
        n_teachers = self._n_sources
        if self.n_teachers_to_sample is None:
            return list(range(n_teachers))
        return sample_teachers(
            n_teachers, self.n_teachers_to_sample, seed=state.rank_zero_seed, step=int(state.timestamp.batch)
        )

    def _set_scheduled_values(self, state: State, logger: Logger) -> None:
        self._weights = (value_at(self.org_loss_weight, state), value_at(self.kd_loss_weight, state))
        scheduled = {}
        if isinstance(self.org_loss_weight, Schedule):
            scheduled[self._log_key('org_loss_weight')] = self._weights[0]
        if isinstance(self.kd_loss_weight, Schedule):
            scheduled[self._log_key('kd_loss_weight')] = self._weights[1]
        if self.temperature is not None:
            self.kd_loss_fn.temperature = value_at(self.temperature, state)
            if isinstance(self.temperature, Schedule):
                scheduled[self._log_key('temperature')] = self.kd_loss_fn.temperature
        if scheduled:
            logger.log_metrics(scheduled)

    def _teacher_logits(
        self, state: State, shape: torch.Size, device: torch.device
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (averaged) teacher logits of this microbatch and its device flag: are they free of NaN and +inf?

        From the cache when every example in the microbatch is recorded there (the flag is then ``None``: only
        finite outputs are ever recorded); otherwise from the teachers, recording their outputs.
        """
        rows = None
        if self._cached_fit is not None:
            cached, rows = self._cached_fit.lookup(state, shape[0], device)
            if cached is not None:
                return cached, None
        logits = teacher_logits(
            [self._runners[index] for index in self._active_teachers],
            state.batch,
            teacher_indices=self._active_teachers,
            expected_shape=shape,
            input_key=self.input_key,
            logits_key=self.teacher_logits_key,
            bare_tensor_is_logits=self._bare_teacher_tensor_is_logits,
            precision=state.precision,
            precision_config=state.precision_config,
        )
        if self._cached_fit is not None:
            self._cached_fit.record(rows, logits)  # poisoned rows are not kept
        return self._guard.screen(logits)  # NaN and +inf in any teacher's logits carry into their mean

    def _distill_from_signal(self, state: State) -> None:
        student_logits = extract_logits(state.outputs, self.student_logits_key, role='student')
        if not self._signal_checked:  # one host sync per fit
            self.teacher_signal.check_vocabulary(state.batch, student_logits)
            self._signal_checked = True
        kd_loss = self.teacher_signal.loss(
            state.batch,
            student_logits,
            self.kd_loss_fn.temperature,
            mask=token_mask(state.batch, student_logits, causal=self._causal),
        )
        org_loss_weight, kd_loss_weight = self._weights
        state.loss = combine_losses(state.loss, kd_loss, org_loss_weight, kd_loss_weight, name=self.name)

    def _distill(self, state: State) -> None:
        if self.teacher_signal is not None:
            self._distill_from_signal(state)
            return
        if self._fused_fit is not None:
            state.loss = self._fused_fit.loss(
                state,
                self._runners,
                self._active_teachers,
                self.kd_loss_fn,
                self._weights,
                causal=self._causal,
                input_key=self.input_key,
                teacher_logits_key=self.teacher_logits_key,
            )
            return
        student_logits = extract_logits(state.outputs, self.student_logits_key, role='student')
        teacher, usable = self._teacher_logits(state, student_logits.shape, student_logits.device)
        labels = None
        if self._loss_takes_labels:  # e.g. DecoupledKD: each position's target class
            labels = target_labels(state.batch, student_logits, causal=self._causal, key=self.student_logits_key)
        kd_loss = distillation_loss(
            student_logits,
            teacher,
            self.kd_loss_fn,
            mask=token_mask(state.batch, student_logits, causal=self._causal),
            loss_takes_mask=self._loss_takes_mask,
            labels=labels,
            loss_takes_labels=self._loss_takes_labels,
        )
        features = self.features.losses(state.batch, self._active_teachers, usable) if self.features else {}
        kd_loss = NonFiniteGuard.mask(kd_loss, usable)
        org_loss_weight, kd_loss_weight = self._weights
        if self._on_policy_fit is not None:  # the student's loss on its own samples is not trained on
            org_loss_weight = self._on_policy_fit.org_loss_weight(org_loss_weight)
        state.loss = combine_losses(
            state.loss, kd_loss, org_loss_weight, kd_loss_weight, extra_terms=features, name=self.name
        )


# help(), editors and the API reference show the constructor's parameters rather than __new__'s catch-all.
_INIT_SIGNATURE = inspect.signature(Distillation.__init__)
Distillation.__signature__ = _INIT_SIGNATURE.replace(parameters=list(_INIT_SIGNATURE.parameters.values())[1:])
