"""The ``Distillation`` algorithm and the pure functions it is made of."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Algorithm, Event, State, get_precision_context
from composer.loggers import Logger
from composer.utils import ensure_tuple
from torch import nn

from composer_kd.cache import TeacherCache
from composer_kd.features import (
    FeatureCapture,
    FeaturePair,
    feature_dim,
    output_width,
    resolve_module,
    select_output,
)
from composer_kd.losses import KLDivergence
from composer_kd.outputs import (
    Key,
    extract_logits,
    is_causal_lm,
    logits_are_usable,
    padding_mask,
    run_teacher,
    token_mask,
)
from composer_kd.schedules import Schedule, ScheduleOrValue, value_at
from composer_kd.teachers import FrozenTeachers, TeacherInference, TeacherRunner, TeacherSpec, resolve_teachers
from composer_kd.window import TimeSpec, parse_time, reached, to_trainer_time

__all__ = ['CombinedLoss', 'Distillation', 'combine_losses', 'distillation_loss', 'average_logits', 'sample_teachers']

#: A loss between student and teacher logits, e.g. :class:`~composer_kd.KLDivergence`.
KDLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def average_logits(teacher_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of several teachers' logits (the ensemble's logits).

    Args:
        teacher_logits (Sequence[torch.Tensor]): One tensor per teacher, all of one shape.

    Returns:
        torch.Tensor: Their mean; the tensor itself for a single teacher.

    Example:
        .. testcode::

            import torch
            from composer_kd import average_logits

            mean = average_logits([torch.zeros(2, 3), torch.ones(2, 3)])
            assert torch.equal(mean, torch.full((2, 3), 0.5))
    """
    if len(teacher_logits) == 1:
        return teacher_logits[0]
    shapes = {tuple(t.shape) for t in teacher_logits}
    if len(shapes) > 1:
        raise ValueError(f'Teachers returned logits of different shapes {sorted(shapes)}; they cannot be averaged.')
    return torch.stack([t.float() for t in teacher_logits]).mean(dim=0)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kd_loss_fn: KDLossFn,
    mask: Optional[torch.Tensor] = None,
    loss_takes_mask: Optional[bool] = None,
) -> torch.Tensor:
    """``kd_loss_fn`` on the positions that count.

    With a ``mask`` over the logits' leading dimensions (e.g. valid tokens of ``[batch, seq, vocab]`` logits),
    a loss that takes a ``mask`` argument (every loss of this package does) receives it; any other loss receives
    only the selected rows, so a loss averaging over rows averages over valid tokens either way. Passing the
    mask spares copying the logits, which matters for large vocabularies.

    Args:
        student_logits (torch.Tensor): The student's logits.
        teacher_logits (torch.Tensor): The teacher's logits, the same shape.
        kd_loss_fn (Callable): Maps ``(student_logits, teacher_logits)`` to a scalar.
        mask (torch.Tensor, optional): Boolean, the logits' shape without the last dimension.
        loss_takes_mask (bool, optional): Whether ``kd_loss_fn`` accepts ``mask=``. Default: ``None``, read from
            its signature (a module's ``forward``) on every call; pass it to spare that.

    Returns:
        torch.Tensor: A scalar; zero (still attached to the student's graph) when no position is valid.

    Raises:
        ValueError: If the shapes differ (the message shows both) or the loss is not a scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd import KLDivergence, distillation_loss

            loss = distillation_loss(torch.randn(4, 10), torch.randn(4, 10), KLDivergence(temperature=2.0))
    """
    if student_logits.shape != teacher_logits.shape:
        same_positions = student_logits.shape[:-1] == teacher_logits.shape[:-1]
        detail = (
            f'the teacher has {teacher_logits.shape[-1]} classes (vocabulary entries), the student '
            f'{student_logits.shape[-1]}; they must share one label set / tokenizer'
            if same_positions
            else 'distillation needs them equal'
        )
        raise ValueError(
            f'Teacher logits have shape {tuple(teacher_logits.shape)} but student logits have shape '
            f'{tuple(student_logits.shape)}: {detail}.'
        )
    if mask is None:
        loss = kd_loss_fn(student_logits, teacher_logits)
    else:
        mask = mask.to(device=student_logits.device, dtype=torch.bool)
        accepts_mask = loss_takes_mask if loss_takes_mask is not None else _takes_mask(kd_loss_fn)
        if accepts_mask:
            # This package's losses average over valid positions and give 0 when there are none, with no host
            # synchronization (which would stall a GPU's queue every step).
            loss = kd_loss_fn(student_logits, teacher_logits, mask=mask)
        elif not mask.any():
            return student_logits.sum() * 0.0
        else:
            loss = kd_loss_fn(student_logits[mask], teacher_logits[mask])
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f'kd_loss_fn must return a scalar tensor, got {shape}.')
    return loss if loss.dim() == 0 else loss.reshape(())


def _takes_mask(fn: Callable) -> bool:
    """Whether the loss ``fn`` accepts a ``mask`` argument (for a module: whether its ``forward`` does)."""
    # A module's own signature is its __call__'s, (*args, **kwargs), whatever its forward takes.
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        return 'mask' in inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


class CombinedLoss(dict):
    """The loss dict a :class:`Distillation` leaves in ``state.loss``: named terms and their weighted ``'total'``.

    A plain ``dict`` to Composer (which logs each entry as ``loss/train/<name>`` and trains on ``'total'``), it
    also remembers the weight of every term in the total, so that a second ``Distillation`` in the same trainer
    adds its own terms to this one's instead of weighting the already combined total as if it were the model's
    own loss (see :func:`combine_losses`).

    Args:
        terms (Mapping[str, torch.Tensor]): The named terms, ``'total'`` among them.
        weights (Mapping[str, float]): The weight of each term that enters ``'total'``, kept as ``.weights``.

    Example:
        .. testcode::

            import torch
            from composer_kd import CombinedLoss, combine_losses

            loss = combine_losses(torch.tensor(2.0), torch.tensor(3.0), org_loss_weight=0.1, kd_loss_weight=0.9)
            assert isinstance(loss, CombinedLoss)
            assert loss.weights == {'original': 0.1, 'kd': 0.9}
            assert torch.isclose(loss['total'], torch.tensor(0.1 * 2.0 + 0.9 * 3.0))
    """

    def __init__(self, terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]):
        super().__init__(terms)
        self.weights = dict(weights)


def combine_losses(
    original_loss: Any,
    kd_loss: torch.Tensor,
    org_loss_weight: float,
    kd_loss_weight: float,
    extra_terms: Optional[Mapping[str, tuple[torch.Tensor, float]]] = None,
    name: Optional[str] = None,
) -> CombinedLoss:
    """The loss dict ``{..original terms.., 'original', 'kd', 'total'}`` that replaces the trainer's loss.

    ``total = org_loss_weight * original + kd_loss_weight * kd``. The original loss may be a tensor, a tuple/list
    of tensors, or a dict (as ``ComposerModel.loss`` may return); like Composer, terms are averaged to scalars
    and summed, and a dict's own ``'total'`` is used as the original total when present. Composer logs every
    entry as ``loss/train/<name>``.

    With a ``name``, the distillation term is ``'kd/<name>'`` and each extra term ``'<term>/<name>'``. When
    ``original_loss`` is itself a :class:`CombinedLoss` (another ``Distillation`` of the same trainer ran
    first), its terms are kept with their weights, the model's own loss (``'original'``) has its weight
    multiplied by ``org_loss_weight``, and this call's terms are added: with several instances ``i``,

    ``total = (prod_i org_loss_weight_i) * original + sum_i kd_loss_weight_i * kd_i (+ extra terms)``

    so the model's own loss is counted once, whatever the number of instances.

    Args:
        original_loss: What the model's ``loss`` returned, or an earlier call's result.
        kd_loss (torch.Tensor): The distillation term, a scalar.
        org_loss_weight (float): Weight of the original loss (a factor of it, on top of an earlier call's).
        kd_loss_weight (float): Weight of the distillation term.
        extra_terms (Mapping[str, tuple[torch.Tensor, float]], optional): Further named ``(loss, weight)`` terms,
            e.g. feature distillation's, added to the total.
        name (str, optional): Names this call's terms, so that several can share one loss dict.

    Returns:
        CombinedLoss: The loss terms and their weighted ``'total'``.

    Raises:
        ValueError: If a term of this call is already in ``original_loss`` (two unnamed or same-named calls).

    Example:
        .. testcode::

            import torch
            from composer_kd import combine_losses

            losses = combine_losses(torch.tensor(2.0), torch.tensor(1.0), org_loss_weight=0.1, kd_loss_weight=0.9)
            assert torch.isclose(losses['total'], torch.tensor(1.1))
            both = combine_losses(losses, torch.tensor(3.0), org_loss_weight=1.0, kd_loss_weight=0.5, name='b')
            assert torch.isclose(both['total'], torch.tensor(0.1 * 2.0 + 0.9 * 1.0 + 0.5 * 3.0))
    """
    suffix = '' if name is None else f'/{name}'
    extra = {f'{key}{suffix}': term for key, term in (extra_terms or {}).items()}
    ours = {'kd' + suffix: (kd_loss, kd_loss_weight), **extra}
    if isinstance(original_loss, CombinedLoss):
        clashing = [key for key in ours if key in original_loss]
        if clashing:
            raise ValueError(
                f'Two Distillation algorithms write the loss term {clashing[0]!r}: give each its own name= so '
                "that each writes its own 'kd/<name>' term."
            )
        terms = {k: v for k, v in original_loss.items() if k != 'total'}
        weights = dict(original_loss.weights)
        weights['original'] = weights['original'] * org_loss_weight
    else:
        taken = {'original', *ours}
        if isinstance(original_loss, torch.Tensor):
            terms = {'original': _scalar(original_loss)}
        elif isinstance(original_loss, Mapping):
            terms = {f'original_{k}' if k in taken else k: _scalar(v) for k, v in original_loss.items()}
            terms['original'] = terms.pop('total') if 'total' in terms else sum(terms.values())
        elif isinstance(original_loss, Sequence) and not isinstance(original_loss, str):
            terms = {f'original_{i}': _scalar(v) for i, v in enumerate(original_loss)}
            terms['original'] = sum(terms.values())
        else:
            raise TypeError(f'Cannot combine an original loss of type {type(original_loss).__name__}.')
        weights = {'original': org_loss_weight}
    for key, (loss, weight) in ours.items():
        terms[key] = loss
        weights[key] = weight
    total = None
    for key, weight in weights.items():
        total = weight * terms[key] if total is None else total + weight * terms[key]
    return CombinedLoss({**terms, 'total': total}, weights)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    # A 0-dim loss (the usual case) is used as it is: a mean over one element is still an op and its backward.
    return loss if loss.dim() == 0 else loss.mean()


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


# Where the projections sit on the student during a fit (suffixed by the instance's name, if it has one).
_PROJECTIONS_NAME = 'distillation_projections'
_NAME = re.compile(r'[A-Za-z0-9_-]+')
# The events every instance handles; each fit adds those its settings need (see ``Distillation._fit_start``).
_FIT_BOUNDARIES = frozenset({Event.INIT, Event.FIT_START, Event.FIT_END})
_CACHE_EVENTS = frozenset({Event.AFTER_DATALOADER, Event.BEFORE_TRAIN_BATCH, Event.AFTER_TRAIN_BATCH, Event.EPOCH_END})


def _as_feature_pair(pair: Union[FeaturePair, Mapping[str, Any]], index: int) -> FeaturePair:
    if isinstance(pair, FeaturePair):
        return pair
    if isinstance(pair, Mapping):
        try:
            return FeaturePair(**pair)
        except TypeError as e:
            raise TypeError(f'feature_pairs[{index}]: {e}') from e
    raise TypeError(f'feature_pairs[{index}] must be a FeaturePair or a dict, got {type(pair).__name__}.')


def sample_teachers(n_teachers: int, k: int, seed: int, step: int) -> list[int]:
    """Indices of ``k`` of ``n_teachers`` teachers for one step, a pure function of ``(seed, step)``.

    Depending on nothing but the seed and the step makes the draw reproducible and identical after a resume,
    with no generator state to checkpoint.

    Args:
        n_teachers (int): How many teachers there are.
        k (int): How many to draw, ``1 <= k <= n_teachers``.
        seed (int): The run's seed (Composer's ``rank_zero_seed``, the same on every rank).
        step (int): The batch index.

    Returns:
        list[int]: ``k`` distinct indices, sorted.

    Example:
        .. testcode::

            from composer_kd import sample_teachers

            assert sample_teachers(4, 2, seed=17, step=3) == sample_teachers(4, 2, seed=17, step=3)
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return sorted(torch.randperm(n_teachers, generator=generator)[:k].tolist())


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
            checkpoints or ``state_dict`` files (local paths or any URI Composer reads).
        kd_loss_fn (Callable, optional): Loss between student and teacher logits, returning a scalar. Default:
            ``KLDivergence(temperature=4.0)``.
        org_loss_weight (float | Schedule, optional): Weight of the model's own loss, constant or following a
            :class:`~composer_kd.schedules.Schedule` over training. Default: ``1.0``.
        kd_loss_weight (float | Schedule, optional): Weight of the distillation loss, likewise. Default: ``1.0``.
        n_teachers_to_sample (int, optional): With several teachers, run only this many, drawn anew each step
            (reproducibly from the trainer's seed). Default: ``None``, every teacher; their logits are averaged.
        start (str | float | Time, optional): When distillation starts: a Composer time string (``'100ba'``,
            ``'2ep'``, ``'0.1dur'``) or a fraction of training. Default: ``0.0``.
        end (str | float | Time, optional): When it stops (exclusive). Default: ``None``, the end of training.
            Outside the window the teachers do not run and the loss is untouched.
        input_key (int | str | Callable, optional): Chooses the teachers' input from the batch, as
            ``composer.utils.batch_get`` does. Default: chosen by the teacher's kind (see
            :func:`~composer_kd.outputs.run_teacher`).
        student_logits_key (int | str | Callable, optional): Chooses the logits in the student's output.
            Default: a tensor output, its ``'logits'`` entry, or its first element.
        teacher_logits_key (int | str | Callable, optional): The same for the teachers' outputs. Default:
            ``student_logits_key``, except that a teacher returning a bare tensor gives that tensor (so a
            single-task teacher can teach one head of a multi-head student chosen by ``student_logits_key``).
        causal_lm (bool, optional): Whether token logits at position ``i`` predict token ``i + 1`` (decoder-only
            language models), which shifts the mask of valid positions by one (see
            :func:`~composer_kd.outputs.token_mask`). Default: ``None``, detected from the student (a Hugging
            Face model that can generate and is not encoder-decoder).
        temperature (float | Schedule, optional): Sets ``kd_loss_fn.temperature`` at every step, e.g. a
            :class:`~composer_kd.LinearSchedule` from soft to sharp (progressive distillation). Default: ``None``,
            the loss keeps its own.
        feature_pairs (Sequence[FeaturePair | dict], optional): Intermediate modules to match, named by path
            (see :class:`~composer_kd.features.FeaturePair`); each adds a ``'feature_<i>'`` term to the loss.
            Where widths differ, a learnable projection owned by this algorithm is trained with the student's
            optimizer and saved in training checkpoints (as ``distillation_projections.*``), but is detached from
            the student when the fit ends. Default: none.
        on_nonfinite_teacher (str, optional): What to do when a teacher's logits hold NaN or +inf: ``'raise'``
            an error naming the step, or ``'skip'`` the distillation terms of that microbatch (the model's own
            loss still trains it) and count it in ``distillation/skipped_microbatches``. Either way no NaN reaches
            a gradient, and the check costs one host synchronization per batch, after the backward passes.
            Default: ``'raise'``.
        teacher_inference (TeacherInference, optional): Opt-in teacher speed-ups: weights kept in bf16,
            channels-last layout, ``torch.compile`` (see :class:`~composer_kd.teachers.TeacherInference`; the
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
    ):
        if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise ValueError(f'name must be a non-empty string of letters, digits, _ and -, got {name!r}.')
        self.name = name
        for argument, weight in (('org_loss_weight', org_loss_weight), ('kd_loss_weight', kd_loss_weight)):
            _check_scheduled(argument, weight, minimum=0.0, inclusive=True)
        if _largest(org_loss_weight) == 0 and _largest(kd_loss_weight) == 0:
            raise ValueError('org_loss_weight and kd_loss_weight are both 0: nothing would be trained.')
        if kd_loss_fn is not None and not callable(kd_loss_fn):
            raise TypeError(f'kd_loss_fn must be callable, got {type(kd_loss_fn).__name__}.')
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

        # Checkpoints are loaded here, so that a bad path or mismatched weights fail before training starts.
        self.teachers = FrozenTeachers(resolve_teachers(teachers))
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
        self.teacher_logits_key = teacher_logits_key if teacher_logits_key is not None else student_logits_key
        # A teacher's bare tensor output is its logits unless a teacher key was asked for explicitly.
        self._bare_teacher_tensor_is_logits = teacher_logits_key is None
        self.causal_lm = causal_lm
        if on_nonfinite_teacher not in ('raise', 'skip'):
            raise ValueError(f"on_nonfinite_teacher must be 'raise' or 'skip', got {on_nonfinite_teacher!r}.")
        self.on_nonfinite_teacher = on_nonfinite_teacher
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
        self._runners: list[TeacherRunner] = []
        self._skipped = 0
        # One device flag per distilled microbatch of the current batch: were its teacher logits usable?
        self._usable: list[torch.Tensor] = []
        self.feature_pairs = [_as_feature_pair(pair, i) for i, pair in enumerate(feature_pairs)]
        for i, pair in enumerate(self.feature_pairs):
            if not 0 <= pair.teacher_index < n_teachers:
                raise ValueError(
                    f'feature_pairs[{i}].teacher_index={pair.teacher_index} but there are {n_teachers} teachers.'
                )
        # Learnable maps from student to teacher feature widths, keyed by pair index; created at Event.INIT.
        self.projections = nn.ModuleDict()
        self._student_feature_modules: list[nn.Module] = []
        self._projection_owner: Optional[nn.Module] = None
        self._captures: Optional[tuple[FeatureCapture, FeatureCapture]] = None

        # Set at fit start: the window in the trainer's units. Set each batch: the teachers that run, and the
        # weights in force.
        self._start: Optional[Any] = None
        self._end: Optional[Any] = None
        self._active_teachers: list[int] = []
        self._causal = False
        self._loss_takes_mask = False
        self._weights = (0.0, 0.0)
        self._events = _FIT_BOUNDARIES
        self._poison_check_event = self._poison_event()

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
            + ')'
        )

    @property
    def teacher_modules(self) -> list[nn.Module]:
        """The teachers, as given (with checkpoint weights loaded)."""
        return self.teachers.modules

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.teacher_cache is not None:
            state['teacher_cache'] = self.teacher_cache.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.teacher_cache is not None and 'teacher_cache' in state:
            self.teacher_cache.load_state_dict(state['teacher_cache'])

    def match(self, event: Event, state: State) -> bool:
        # Identity tests and one set lookup: match runs for every event of every step, and equality of
        # Composer's events (a StringEnum) costs a Python call per comparison.
        if event is Event.AFTER_LOSS:
            return bool(self._active_teachers)
        if event is self._poison_check_event and self._usable:
            return True
        return event in self._events

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event is Event.AFTER_LOSS:
            self._distill(state)
        elif event is Event.BATCH_START:
            self._active_teachers = self._teachers_for_batch(state)
            if self._active_teachers:
                self._set_scheduled_values(state, logger)
            self._capture(bool(self._active_teachers))
        elif event is Event.AFTER_TRAIN_BATCH or event is Event.BATCH_END:
            if event is Event.AFTER_TRAIN_BATCH and self.teacher_cache is not None:
                self.teacher_cache.finish_batch()
            if event is self._poison_check_event:
                self._check_poisoned(state, logger)
            if event is Event.BATCH_END:
                self._capture(False)
        elif event is Event.AFTER_DATALOADER:
            assert self.teacher_cache is not None
            self.teacher_cache.take_index(state)
        elif event is Event.BEFORE_TRAIN_BATCH:
            assert self.teacher_cache is not None
            self.teacher_cache.start_microbatches()
        elif event is Event.EPOCH_END:
            assert self.teacher_cache is not None
            self.teacher_cache.exchange(state.device.tensor_to_device)
        elif event is Event.INIT:
            self._check_unique_name(state)
            self._init_features(state)
        elif event is Event.FIT_START:
            self._fit_start(state, logger)
        elif event is Event.FIT_END:
            self._active_teachers = []
            self._events = _FIT_BOUNDARIES
            self._remove_captures()
            self._attach_projections(False)
            for runner in self._runners:
                runner.release()
            self._runners = []
            self.teachers.restore()
            if self.teacher_cache is not None:
                self.teacher_cache.flush()

    def _varies_per_batch(self) -> bool:
        """Whether the teachers that run or the values in force can change from one batch to the next."""
        scheduled = (self.org_loss_weight, self.kd_loss_weight, self.temperature)
        return (
            bool(self.feature_pairs)  # feature capture is switched on and off around every batch
            or self.n_teachers_to_sample is not None
            or self.start.value != 0
            or self.end is not None
            or any(isinstance(value, Schedule) for value in scheduled)
        )

    def _check_unique_name(self, state: State) -> None:
        for other in state.algorithms:
            if other is not self and isinstance(other, Distillation) and other.name == self.name:
                raise ValueError(
                    f'Two Distillation algorithms in one Trainer are both named {self.name!r}: each writes its loss '
                    "term as 'kd/<name>' ('kd' without a name), so give each a distinct name=."
                )

    def _log_key(self, key: str) -> str:
        return f'distillation/{key}' if self.name is None else f'distillation/{self.name}/{key}'

    @property
    def _projections_name(self) -> str:
        return _PROJECTIONS_NAME if self.name is None else f'{_PROJECTIONS_NAME}_{self.name}'

    @property
    def find_unused_parameters(self) -> bool:
        # Outside the window, or when a sampled step skips a pair's teacher, projections get no gradient.
        return bool(self.projections)

    def _attach_projections(self, attached: bool) -> None:
        """Lend the projections to the student during a fit, and take them back when it ends.

        While attached they are ordinary parameters of the model, so Composer's optimizer, checkpoints (under
        ``distillation_projections.``), resumption and DDP gradient averaging all treat them like the student's
        own; once the fit ends the student is exactly the model the user gave.
        """
        if self._projection_owner is None or not self.projections:
            return
        if attached:
            self._projection_owner.add_module(self._projections_name, self.projections)
        elif hasattr(self._projection_owner, self._projections_name):
            delattr(self._projection_owner, self._projections_name)

    def _init_features(self, state: State) -> None:
        """Resolve the feature modules and create projections while the optimizer can still take them in.

        Event.INIT comes after the optimizer is built but before a checkpoint is loaded, so projections added
        here are restored with the model's and the optimizer's state on resume.
        """
        self._student_feature_modules = []
        for i, pair in enumerate(self.feature_pairs):
            student_module = resolve_module(state.model, pair.student, role='student')
            teacher_module = resolve_module(self.teachers.modules[pair.teacher_index], pair.teacher, role='teacher')
            self._student_feature_modules.append(student_module)
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
            state.device.module_to_device(self.projections)
            self._projection_owner = state.model
            self._attach_projections(True)
            optimizer = ensure_tuple(state.optimizers)[0]
            # Train the projections as the student's first group is trained (the same lr, weight decay, and keys
            # such as Composer's 'initial_lr' that a plain add_param_group would leave out).
            group = {k: v for k, v in optimizer.param_groups[0].items() if k != 'params'}
            optimizer.add_param_group({**group, 'params': list(self.projections.parameters())})

    def _capture(self, enabled: bool) -> None:
        if self._captures is not None:
            for capture in self._captures:
                capture.enabled = enabled
                capture.clear()

    def _remove_captures(self) -> None:
        if self._captures is not None:
            for capture in self._captures:
                capture.remove()
            self._captures = None

    def _feature_losses(self, state: State, active: set[int]) -> dict[str, tuple[torch.Tensor, float]]:
        assert self._captures is not None
        student_outputs, teacher_outputs = (capture.outputs for capture in self._captures)
        terms = {}
        for i, pair in enumerate(self.feature_pairs):
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
                student = self.projections[key](student.movedim(dim, -1)).movedim(-1, dim)
            elif pair.projectable and student.shape != teacher.shape:
                raise ValueError(
                    f'feature_pairs[{i}]: student features {tuple(student.shape)} ({pair.student!r}) and teacher '
                    f'features {tuple(teacher.shape)} ({pair.teacher!r}) differ and no projection was made: pass '
                    'student_dim= and teacher_dim= (the feature widths) to have one learned.'
                )
            # Token features [B, S, D] and attention probabilities [B, H, S, S] are masked by query position.
            positions = (student.shape[0], student.shape[2]) if pair.loss == 'attention_probs' else student.shape[:-1]
            mask = padding_mask(state.batch, tuple(positions))
            terms[f'feature_{i}'] = (pair.loss_fn(student, teacher, mask), pair.weight)
        return terms

    def _poison_event(self) -> Event:
        # To raise, before the optimizer step; to skip, after it, where Composer's own read of the loss has
        # already waited for the device (so the check adds no stall).
        return Event.AFTER_TRAIN_BATCH if self.on_nonfinite_teacher == 'raise' else Event.BATCH_END

    def _fit_start(self, state: State, logger: Logger) -> None:
        student_params = {id(p) for p in state.model.parameters()}
        for i, teacher in enumerate(self.teachers.modules):
            if any(id(p) in student_params for p in teacher.parameters()):
                raise ValueError(
                    f'teachers[{i}] shares parameters with the student being trained; a teacher must be a '
                    'separate, fixed model (copy it with copy.deepcopy if it starts from the same weights).'
                )
        self.teachers.freeze()
        for teacher in self.teachers.modules:
            state.device.module_to_device(teacher)
        self._runners = [TeacherRunner(teacher, self.teacher_inference) for teacher in self.teachers.modules]
        running = [runner.prepare() for runner in self._runners]
        if self.feature_pairs:
            self._attach_projections(True)  # again, for a second fit() with the same trainer
            self._remove_captures()
            # Watch the modules that actually run (a converted copy, where teacher_inference made one).
            teacher_modules = {
                str(i): resolve_module(running[pair.teacher_index], pair.teacher, role='teacher')
                for i, pair in enumerate(self.feature_pairs)
            }
            self._captures = (
                FeatureCapture({str(i): module for i, module in enumerate(self._student_feature_modules)}),
                FeatureCapture(teacher_modules),
            )
        self._causal = self.causal_lm if self.causal_lm is not None else is_causal_lm(state.model)
        self._loss_takes_mask = _takes_mask(self.kd_loss_fn)
        if self.teacher_cache is not None:
            self.teacher_cache.start(
                state,
                self.teachers.modules,
                input_key=self.input_key,
                logits_key=self.teacher_logits_key,
                teacher_dtype=self.teacher_inference.dtype,
                algorithms=[a for a in state.algorithms if a is not self],
            )
        self._start = to_trainer_time(self.start, state)
        self._end = None if self.end is None else to_trainer_time(self.end, state)
        # Only the events these settings need: every event an algorithm handles costs Composer's engine a trace
        # and a log call, which on a GPU at millisecond steps is a visible share of the step.
        events = set(_FIT_BOUNDARIES)
        if self._varies_per_batch():
            events.add(Event.BATCH_START)
        else:
            self._active_teachers = list(range(len(self.teachers.modules)))
            self._set_scheduled_values(state, logger)
        if self.feature_pairs:
            events.add(Event.BATCH_END)
        if self.teacher_cache is not None:
            events |= _CACHE_EVENTS
        self._events = frozenset(events)
        self._poison_check_event = self._poison_event()

    def _teachers_for_batch(self, state: State) -> list[int]:
        """Indices of the teachers that run this batch: none outside the window, else all or a sample."""
        if not reached(self._start, state) or reached(self._end, state):
            return []
        n_teachers = len(self.teachers.modules)
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

    def _check_poisoned(self, state: State, logger: Logger) -> None:
        """Act on the microbatches whose teacher logits were poisoned: one host sync per batch.

        The flags stay on the device while the batch runs, so the teacher's forward pass never waits for the
        host; they are read once the backward passes are done, before the optimizer step (to raise) or after it
        (to count).
        """
        if not self._usable:
            return
        flags, self._usable = self._usable, []
        n_poisoned = len(flags) - int(flags[0] if len(flags) == 1 else torch.stack(flags).sum())
        if not n_poisoned:
            return
        if self.on_nonfinite_teacher == 'raise':
            where = f'batch {int(state.timestamp.batch)} (epoch {int(state.timestamp.epoch)})'
            raise FloatingPointError(
                f'A teacher produced NaN or +inf logits at {where}; the student was not updated from them. '
                "Pass on_nonfinite_teacher='skip' to train on without the distillation terms of such microbatches."
            )
        self._skipped += n_poisoned
        logger.log_metrics({self._log_key('skipped_microbatches'): self._skipped})

    def _teacher_logits(
        self, state: State, student_logits: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (averaged) teacher logits of this microbatch and its device flag: are they free of NaN and +inf?

        From the cache when every example in the microbatch is recorded there (the flag is then ``None``: only
        finite outputs are ever recorded); otherwise from the teachers, recording their outputs.
        """
        rows = None
        if self.teacher_cache is not None:
            rows = self.teacher_cache.microbatch_rows(state, student_logits.shape[0])
            cached = self.teacher_cache.lookup(rows, student_logits.device)
            if cached is not None:
                return cached, None
        teacher_logits = []
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            for index in self._active_teachers:
                runner = self._runners[index]
                if runner.module.training:  # something outside switched it back; dropout must stay off
                    runner.module.eval()
                output = run_teacher(runner.module, runner.inputs(state.batch), self.input_key)
                bare = self._bare_teacher_tensor_is_logits and isinstance(output, torch.Tensor)
                teacher_logits.append(extract_logits(output, None if bare else self.teacher_logits_key, role='teacher'))
        logits = average_logits(teacher_logits)  # NaN and +inf in any teacher's logits carry into their mean
        if self.teacher_cache is not None:
            assert rows is not None
            self.teacher_cache.record(rows, logits)  # poisoned rows are not kept
        usable = logits_are_usable(logits)
        self._usable.append(usable)
        # Zeroed when unusable (so no NaN reaches any gradient) on the device, without waiting for the flag; a new
        # tensor, so the teacher's own output, which may be a tensor the user holds, is left as it was.
        return torch.where(usable, logits, 0.0), usable

    def _distill(self, state: State) -> None:
        student_logits = extract_logits(state.outputs, self.student_logits_key, role='student')
        teacher_logits, usable = self._teacher_logits(state, student_logits)
        kd_loss = distillation_loss(
            student_logits,
            teacher_logits,
            self.kd_loss_fn,
            mask=token_mask(state.batch, student_logits, causal=self._causal),
            loss_takes_mask=self._loss_takes_mask,
        )
        features = {}
        if self.feature_pairs:
            assert usable is not None  # feature pairs never come with a cache
            features = {
                name: (torch.where(usable, loss, 0.0), weight)
                for name, (loss, weight) in self._feature_losses(state, set(self._active_teachers)).items()
            }
            for capture in self._captures or ():
                capture.clear()  # this microbatch's features are used; the next records its own
        if usable is not None:
            kd_loss = torch.where(usable, kd_loss, 0.0)
        state.loss = combine_losses(state.loss, kd_loss, *self._weights, extra_terms=features, name=self.name)
