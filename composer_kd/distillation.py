"""The ``Distillation`` algorithm and the pure functions it is made of."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from composer.core import Algorithm, Event, State, get_precision_context
from composer.loggers import Logger
from torch import nn

from composer_kd.losses import KLDivergence
from composer_kd.outputs import Key, extract_logits, is_causal_lm, run_teacher, token_mask
from composer_kd.schedules import Schedule, ScheduleOrValue, value_at
from composer_kd.teachers import FrozenTeachers, TeacherSpec, resolve_teachers
from composer_kd.window import TimeSpec, parse_time, reached, to_trainer_time

__all__ = ['Distillation', 'combine_losses', 'distillation_loss', 'average_logits', 'sample_teachers']

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
) -> torch.Tensor:
    """``kd_loss_fn`` on the positions that count.

    With a ``mask`` over the logits' leading dimensions (e.g. valid tokens of ``[batch, seq, vocab]`` logits),
    only the selected rows reach ``kd_loss_fn``, so any loss averaging over rows averages over valid tokens.

    Args:
        student_logits (torch.Tensor): The student's logits.
        teacher_logits (torch.Tensor): The teacher's logits, the same shape.
        kd_loss_fn (Callable): Maps ``(student_logits, teacher_logits)`` to a scalar.
        mask (torch.Tensor, optional): Boolean, the logits' shape without the last dimension.

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
    if mask is not None:
        mask = mask.to(device=student_logits.device, dtype=torch.bool)
        if not mask.any():
            return student_logits.sum() * 0.0
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    loss = kd_loss_fn(student_logits, teacher_logits)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f'kd_loss_fn must return a scalar tensor, got {shape}.')
    return loss.reshape(())


def combine_losses(
    original_loss: Any,
    kd_loss: torch.Tensor,
    org_loss_weight: float,
    kd_loss_weight: float,
) -> dict[str, torch.Tensor]:
    """The loss dict ``{..original terms.., 'original', 'kd', 'total'}`` that replaces the trainer's loss.

    ``total = org_loss_weight * original + kd_loss_weight * kd``. The original loss may be a tensor, a tuple/list
    of tensors, or a dict (as ``ComposerModel.loss`` may return); like Composer, terms are averaged to scalars
    and summed, and a dict's own ``'total'`` is used as the original total when present. Composer logs every
    entry as ``loss/train/<name>``.

    Args:
        original_loss: What the model's ``loss`` returned.
        kd_loss (torch.Tensor): The distillation term, a scalar.
        org_loss_weight (float): Weight of the original loss.
        kd_loss_weight (float): Weight of the distillation term.

    Returns:
        dict[str, torch.Tensor]: The loss terms and their weighted ``'total'``.

    Example:
        .. testcode::

            import torch
            from composer_kd import combine_losses

            losses = combine_losses(torch.tensor(2.0), torch.tensor(1.0), org_loss_weight=0.1, kd_loss_weight=0.9)
            assert torch.isclose(losses['total'], torch.tensor(1.1))
    """
    if isinstance(original_loss, torch.Tensor):
        terms = {'original': original_loss.mean()}
        original_total = terms['original']
    elif isinstance(original_loss, Mapping):
        terms = {f'original_{k}' if k in ('original', 'kd') else k: v.mean() for k, v in original_loss.items()}
        original_total = terms.pop('total') if 'total' in terms else sum(terms.values())
        terms['original'] = original_total
    elif isinstance(original_loss, Sequence) and not isinstance(original_loss, str):
        terms = {f'original_{i}': v.mean() for i, v in enumerate(original_loss)}
        original_total = sum(terms.values())
        terms['original'] = original_total
    else:
        raise TypeError(f'Cannot combine an original loss of type {type(original_loss).__name__}.')
    return {**terms, 'kd': kd_loss, 'total': org_loss_weight * original_total + kd_loss_weight * kd_loss}


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


def sample_teachers(n_teachers: int, k: int, seed: int, step: int) -> list[int]:
    """Indices of ``k`` of ``n_teachers`` teachers for one step, a pure function of ``(seed, step)``.

    Depending on nothing but the seed and the step makes the draw reproducible and identical after a resume,
    with no generator state to checkpoint.

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
    each term.

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
            ``student_logits_key``.
        causal_lm (bool, optional): Whether token logits at position ``i`` predict token ``i + 1`` (decoder-only
            language models), which shifts the mask of valid positions by one (see
            :func:`~composer_kd.outputs.token_mask`). Default: ``None``, detected from the student (a Hugging
            Face model that can generate and is not encoder-decoder).
        temperature (float | Schedule, optional): Sets ``kd_loss_fn.temperature`` at every step, e.g. a
            :class:`~composer_kd.LinearSchedule` from soft to sharp (progressive distillation). Default: ``None``,
            the loss keeps its own.

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
    ):
        for name, weight in (('org_loss_weight', org_loss_weight), ('kd_loss_weight', kd_loss_weight)):
            _check_scheduled(name, weight, minimum=0.0, inclusive=True)
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
        self.causal_lm = causal_lm

        # Set at fit start: the window in the trainer's units. Set each batch: the teachers that run, and the
        # weights in force.
        self._start: Optional[Any] = None
        self._end: Optional[Any] = None
        self._active_teachers: list[nn.Module] = []
        self._causal = False
        self._weights = (0.0, 0.0)

    def __repr__(self) -> str:
        # Kept short and free of the teachers' weights: Composer stores this string in every checkpoint.
        return (
            f'Distillation(n_teachers={len(self.teachers.modules)}, kd_loss_fn={self.kd_loss_fn!r}, '
            f'org_loss_weight={self.org_loss_weight}, kd_loss_weight={self.kd_loss_weight}, '
            f'temperature={self.temperature}, n_teachers_to_sample={self.n_teachers_to_sample}, '
            f'start={self.start}, end={self.end})'
        )

    @property
    def teacher_modules(self) -> list[nn.Module]:
        """The teachers, as given (with checkpoint weights loaded)."""
        return self.teachers.modules

    def match(self, event: Event, state: State) -> bool:
        if event == Event.AFTER_LOSS:
            return bool(self._active_teachers)
        return event in (Event.FIT_START, Event.BATCH_START, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.BATCH_START:
            self._active_teachers = self._teachers_for_batch(state)
            if self._active_teachers:
                self._set_scheduled_values(state, logger)
        elif event == Event.AFTER_LOSS:
            self._distill(state)
        elif event == Event.FIT_END:
            self._active_teachers = []
            self.teachers.restore()

    def _fit_start(self, state: State) -> None:
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
        self._causal = self.causal_lm if self.causal_lm is not None else is_causal_lm(state.model)
        self._start = to_trainer_time(self.start, state)
        self._end = None if self.end is None else to_trainer_time(self.end, state)

    def _teachers_for_batch(self, state: State) -> list[nn.Module]:
        if not reached(self._start, state) or reached(self._end, state):
            return []
        teachers = self.teachers.modules
        if self.n_teachers_to_sample is None:
            return teachers
        chosen = sample_teachers(
            len(teachers),
            self.n_teachers_to_sample,
            seed=state.rank_zero_seed,
            step=int(state.timestamp.batch),
        )
        return [teachers[i] for i in chosen]

    def _set_scheduled_values(self, state: State, logger: Logger) -> None:
        self._weights = (value_at(self.org_loss_weight, state), value_at(self.kd_loss_weight, state))
        scheduled = {}
        if isinstance(self.org_loss_weight, Schedule):
            scheduled['distillation/org_loss_weight'] = self._weights[0]
        if isinstance(self.kd_loss_weight, Schedule):
            scheduled['distillation/kd_loss_weight'] = self._weights[1]
        if self.temperature is not None:
            self.kd_loss_fn.temperature = value_at(self.temperature, state)
            if isinstance(self.temperature, Schedule):
                scheduled['distillation/temperature'] = self.kd_loss_fn.temperature
        if scheduled:
            logger.log_metrics(scheduled)

    def _distill(self, state: State) -> None:
        student_logits = extract_logits(state.outputs, self.student_logits_key, role='student')
        teacher_logits = []
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            for teacher in self._active_teachers:
                if teacher.training:  # something outside switched it back; dropout must stay off
                    teacher.eval()
                output = run_teacher(teacher, state.batch, self.input_key)
                teacher_logits.append(extract_logits(output, self.teacher_logits_key, role='teacher'))
        kd_loss = distillation_loss(
            student_logits,
            average_logits(teacher_logits),
            self.kd_loss_fn,
            mask=token_mask(state.batch, student_logits, causal=self._causal),
        )
        state.loss = combine_losses(state.loss, kd_loss, *self._weights)
