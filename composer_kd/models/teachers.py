"""Teachers: accepting them in every form a user has them, freezing them, and running them on a batch.

Their checkpoints are read by :mod:`composer_kd.models.checkpoints` (``load_teacher_checkpoint`` is importable
from here too).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from composer.core import Precision, get_precision_context
from composer.models import HuggingFaceModel
from composer.utils import dist
from torch import nn

from composer_kd.models.checkpoints import align_state_dict_keys, load_teacher_checkpoint
from composer_kd.models.outputs import Key, describe_batch, extract_logits, run_teacher
from composer_kd.models.sharding import TeacherSharding, holds_weights, release_gathered

__all__ = [
    'FrozenTeachers',
    'align_state_dict_keys',
    'TeacherInference',
    'TeacherRunner',
    'TeacherSpec',
    'average_logits',
    'check_teachers_can_run',
    'refuse_shared_parameters',
    'load_teacher_checkpoint',
    'resolve_teacher_logits_key',
    'resolve_teachers',
    'sample_teachers',
    'teacher_logits',
    'teacher_output',
]

#: What ``Distillation(teachers=...)`` accepts.
TeacherSpec = Union[nn.Module, Sequence[nn.Module], Mapping[str, nn.Module]]


def resolve_teachers(teachers: TeacherSpec) -> list[nn.Module]:
    """Turn every accepted form of ``teachers`` into a list of modules, loading checkpoints where given.

    Args:
        teachers: A module (plain, ``ComposerModel`` or Hugging Face ``PreTrainedModel``), a list of modules, or a
            dict ``{checkpoint_path: module}`` whose weights are loaded from each path.

    Returns:
        list[nn.Module]: The teachers, in the order given.

    Raises:
        ValueError: If there are no teachers.
        TypeError: If an entry is not a module, or a dict key is not a path.
    """
    if isinstance(teachers, nn.Module):
        return [teachers]
    if isinstance(teachers, Mapping):
        resolved = []
        for path, model in teachers.items():
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f'teachers: dict keys must be checkpoint paths, got {type(path).__name__}.')
            if not isinstance(model, nn.Module):
                raise TypeError(f'teachers[{path!r}] must be an nn.Module, got {type(model).__name__}.')
            # A teacher built on the meta device holds no weights to load into: under FSDP a sharded teacher takes
            # rank zero's (see models.sharding), and reading the file on every rank would hold a full copy on each.
            resolved.append(model if not holds_weights(model) else load_teacher_checkpoint(model, os.fspath(path)))
    elif isinstance(teachers, Sequence) and not isinstance(teachers, str):
        resolved = list(teachers)
        for i, model in enumerate(resolved):
            if not isinstance(model, nn.Module):
                raise TypeError(f'teachers[{i}] must be an nn.Module, got {type(model).__name__}.')
    else:
        raise TypeError(
            'teachers must be an nn.Module, a list of modules, or a dict {checkpoint_path: module}, '
            f'got {type(teachers).__name__}.'
        )
    if not resolved:
        raise ValueError('teachers: at least one teacher is required, got none.')
    return resolved


@dataclass
class _ModuleFlags:
    training: dict[str, bool]
    requires_grad: dict[str, bool]


class FrozenTeachers:
    """Holds teachers frozen for a fit: eval mode, no gradients; restores the user's flags afterwards.

    Args:
        teachers (list[nn.Module]): The teachers.
    """

    def __init__(self, teachers: list[nn.Module]):
        self.modules = teachers
        self._saved: list[_ModuleFlags] = []

    def freeze(self) -> None:
        """Put every teacher in eval mode with gradients off, remembering what each had."""
        self._saved = [
            _ModuleFlags(
                training={name: m.training for name, m in teacher.named_modules()},
                requires_grad={name: p.requires_grad for name, p in teacher.named_parameters()},
            )
            for teacher in self.modules
        ]
        for teacher in self.modules:
            teacher.eval()
            teacher.requires_grad_(False)

    def restore(self) -> None:
        """Give each teacher back the train/eval modes and ``requires_grad`` flags it had before :meth:`freeze`."""
        if not self._saved:  # never frozen (the fit failed before starting)
            return
        for teacher, flags in zip(self.modules, self._saved, strict=True):
            for name, module in teacher.named_modules():
                module.training = flags.training.get(name, module.training)
            for name, param in teacher.named_parameters():
                param.requires_grad_(flags.requires_grad.get(name, param.requires_grad))
        self._saved = []


@dataclass
class TeacherInference:
    """How teachers are run: opt-in speed-ups, each off by default until measured to help where it is used.

    Whether one helps depends on the hardware and the model; :func:`~composer_kd.models.speed.measure_teacher_inference`
    times the teacher's forward pass with each on the machine at hand.

    Args:
        dtype (torch.dtype, optional): Keep a copy of each teacher's weights in this dtype (e.g.
            ``torch.bfloat16``) and feed it floating inputs of that dtype. The user's teacher is not converted.
        channels_last (bool): Lay CNN teachers and their 4-D inputs out channels-last.
        compile (bool | dict): Compile each teacher with ``torch.compile`` (a dict gives its keyword arguments).
        shard (bool): When the student is sharded by FSDP (version 1 or 2), shard each teacher across the ranks too
            (a forward-only FSDP-2 copy, see :mod:`composer_kd.models.sharding`), so each rank holds ``1/N`` of it
            between forward passes. ``False`` keeps a full replica of each teacher on every rank. Without FSDP it
            does nothing. Default: ``True``.

    Example:
        .. testcode::

            import torch
            from composer_kd import Distillation, TeacherInference

            teacher = torch.nn.Linear(8, 3)
            distillation = Distillation(teacher, teacher_inference=TeacherInference(dtype=torch.bfloat16))
    """

    dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    compile: Union[bool, dict[str, Any]] = False
    shard: bool = True

    @property
    def enabled(self) -> bool:
        return self.dtype is not None or self.channels_last or bool(self.compile)


def _adapt_inputs(batch: Any, options: TeacherInference) -> Any:
    """A copy of ``batch`` whose floating tensors have the teacher's dtype and layout; integers stay as they are."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            if options.dtype is not None:
                batch = batch.to(options.dtype)
            if options.channels_last and batch.ndim == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {k: _adapt_inputs(v, options) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_adapt_inputs(v, options) for v in batch)
    return batch


class TeacherRunner:
    """Runs one frozen teacher with :class:`TeacherInference` options, and undoes them when the fit ends.

    Args:
        teacher (nn.Module): The (frozen, placed) teacher.
        options (TeacherInference): What to apply.
        sharding (TeacherSharding, optional): Run a sharded copy of the teacher instead (see
            :mod:`composer_kd.models.sharding`). Default: ``None``, the teacher itself runs.
    """

    def __init__(self, teacher: nn.Module, options: TeacherInference, sharding: Optional[TeacherSharding] = None):
        self.teacher = teacher
        self.options = options
        self.sharding = sharding
        self.module = teacher
        self._changed_user_module = False

    def prepare(self) -> nn.Module:
        """Apply the options; return the module that will run (whose submodules feature hooks must watch)."""
        options = self.options
        module = self.teacher
        if options.dtype is not None:
            # A converted copy: casting the user's own module down and back would lose its precision.
            module = copy.deepcopy(self.teacher).to(dtype=options.dtype)
        if self.sharding is not None:
            module = self.sharding.apply(module)
        if options.channels_last:
            module.to(memory_format=torch.channels_last)
        if options.compile:
            target = module.model if isinstance(module, HuggingFaceModel) else module
            target.compile(**(options.compile if isinstance(options.compile, dict) else {}))
        self._changed_user_module = module is self.teacher and (options.channels_last or bool(options.compile))
        self.module = module
        return module

    def inputs(self, batch: Any) -> Any:
        return _adapt_inputs(batch, self.options) if (self.options.dtype or self.options.channels_last) else batch

    def release(self) -> None:
        """Give the user's teacher back in its own layout and uncompiled; drop any converted copy."""
        if self._changed_user_module:
            if self.options.channels_last:
                self.teacher.to(memory_format=torch.contiguous_format)
            if self.options.compile:
                target = self.teacher.model if isinstance(self.teacher, HuggingFaceModel) else self.teacher
                target._compiled_call_impl = None
        self.module = self.teacher
        self._changed_user_module = False


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


def resolve_teacher_logits_key(
    student_logits_key: Optional[Key], teacher_logits_key: Optional[Key]
) -> tuple[Key, bool]:
    """The key that chooses the logits in a teacher's output, and whether a bare tensor output is the logits.

    Without a teacher key of its own, a teacher is read with the student's key, except that a teacher returning a
    bare tensor gives that tensor: a single-task teacher can then teach one head of a multi-head student chosen by
    ``student_logits_key``. An explicit teacher key applies to every output, bare tensors included.

    Args:
        student_logits_key (int | str | Callable, optional): ``Distillation``'s ``student_logits_key``.
        teacher_logits_key (int | str | Callable, optional): ``Distillation``'s ``teacher_logits_key``.

    Returns:
        tuple: The key to read teachers' outputs with (``None``: the default rule of
        :func:`~composer_kd.models.outputs.extract_logits`), and whether a bare tensor output is taken as it is.

    Example:
        .. testcode::

            from composer_kd.models.teachers import resolve_teacher_logits_key

            assert resolve_teacher_logits_key('digit', None) == ('digit', True)
            assert resolve_teacher_logits_key('digit', 'logits') == ('logits', False)
    """
    if teacher_logits_key is not None:
        return teacher_logits_key, False
    return student_logits_key, True


def teacher_logits(
    teachers: Sequence[Union[nn.Module, TeacherRunner]],
    batch: Any,
    *,
    input_key: Optional[Key] = None,
    logits_key: Optional[Key] = None,
    bare_tensor_is_logits: bool = False,
    precision: Union[str, Precision] = Precision.FP32,
    precision_config: Optional[dict[str, Any]] = None,
    teacher_indices: Optional[Sequence[int]] = None,
    expected_shape: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """The teachers' logits for one (micro)batch: each teacher run on ``batch`` and their logits averaged.

    The one place a teacher is run for distillation, whether during a fit, to fill a teacher cache or to time
    inference options. Teachers run without gradients, under ``precision``, and in eval mode (a teacher found in
    training mode, switched back by something outside, is put back in eval mode: dropout must stay off). A
    :class:`TeacherRunner` runs its prepared module on inputs adapted to its options.

    Args:
        teachers (Sequence[nn.Module | TeacherRunner]): The (frozen, placed) teachers.
        batch (Any): The batch the student received.
        input_key (int | str | Callable, optional): Chooses the teachers' input, as in
            :func:`~composer_kd.models.outputs.run_teacher`. Default: ``None``.
        logits_key (int | str | Callable, optional): Chooses the logits in each output, as in
            :func:`~composer_kd.models.outputs.extract_logits`. Default: ``None``.
        bare_tensor_is_logits (bool, optional): Take a bare tensor output as the logits whatever ``logits_key``
            says (see :func:`resolve_teacher_logits_key`). Default: ``False``.
        precision (str | Precision, optional): Composer precision to run under. Default: ``'fp32'``.
        precision_config (dict, optional): As Composer's ``get_precision_context`` takes it. Default: ``None``.
        teacher_indices (Sequence[int], optional): Each teacher's index among all of them, for error messages.
            Default: their positions in ``teachers``.
        expected_shape (Sequence[int], optional): The student's logits' shape. A teacher returning a tuple whose
            first element (taken as its logits) has another shape is refused, naming ``teacher_logits_key=``.
            Default: ``None``, not checked.

    Returns:
        torch.Tensor: The logits, averaged over teachers (see :func:`average_logits`).

    Raises:
        RuntimeError, TypeError, ValueError, IndexError: When a teacher's forward pass fails, the same error type,
            its message naming the teacher, the batch it received and ``input_key``.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.teachers import teacher_logits

            teachers = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
            batch = (torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
            logits = teacher_logits(teachers, batch)
            expected = (teachers[0](batch[0]) + teachers[1](batch[0])) / 2
            assert torch.allclose(logits, expected)
    """
    logits = []
    with torch.no_grad(), get_precision_context(precision, precision_config):
        for position, teacher in enumerate(teachers):
            index = position if teacher_indices is None else teacher_indices[position]
            output = teacher_output(teacher, batch, input_key=input_key, index=index)
            key = None if bare_tensor_is_logits and isinstance(output, torch.Tensor) else logits_key
            chosen = extract_logits(output, key, role='teacher')
            if key is None and isinstance(output, (tuple, list)) and _differs(chosen, expected_shape):
                raise ValueError(
                    f'teachers[{index}] returned a {type(output).__name__} of {len(output)} elements whose first, '
                    f"taken as its logits, has shape {tuple(chosen.shape)}, while the student's logits have "
                    f"shape {tuple(expected_shape)}. If the teacher's logits are another element of its output, "
                    'choose it with teacher_logits_key= (e.g. teacher_logits_key=1).'
                )
            logits.append(chosen)
    return average_logits(logits)


def _differs(logits: torch.Tensor, expected_shape: Optional[Sequence[int]]) -> bool:
    return expected_shape is not None and tuple(logits.shape) != tuple(expected_shape)


def _attributed(error: Exception, index: int, module: nn.Module, inputs: Any, input_key: Optional[Key]) -> Exception:
    """``error`` raised by a teacher's forward pass, said again with which teacher it was and what it was given."""
    if 'out of memory' in str(error):  # Composer retries OOMs with smaller microbatches by matching its text
        return error
    chosen = f'input_key={input_key!r}' if input_key is not None else 'input_key=None (the default choice of input)'
    message = (
        f'teachers[{index}] ({type(module).__name__}) failed on the batch it was given, '
        f'{describe_batch(inputs)}, with {chosen}: {error}. If the teacher takes another part of the batch, '
        'choose it with input_key= (an index, a key, or a callable taking the batch).'
    )
    try:
        return type(error)(message)
    except Exception:  # an exception class whose constructor takes other arguments
        return RuntimeError(message)


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


def check_teachers_can_run(
    teachers: Sequence[nn.Module], student: nn.Module, converts_dtype: bool, weights_from_rank0: bool = False
) -> None:
    """Refuse, when a fit starts, teachers that hold no weights or whose weights' dtype the student's batch cannot
    meet, naming the teacher and what to do (rather than a bare PyTorch error at the first step).

    Args:
        teachers (Sequence[nn.Module]): The teachers.
        student (nn.Module): The student being trained.
        converts_dtype (bool): Whether the teachers run on copies converted to another dtype (a
            :class:`TeacherInference` ``dtype``), which makes their own dtype irrelevant.
        weights_from_rank0 (bool, optional): Whether the teachers are sharded, their weights taken from rank zero's
            teachers (see :func:`~composer_kd.models.sharding.shard_teacher`): then a teacher on the meta device is
            accepted on every other rank. Default: ``False``.

    Raises:
        ValueError: For a teacher with parameters on the ``meta`` device, or float64 parameters beside a student
            that is not float64.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.teachers import check_teachers_can_run

            check_teachers_can_run([torch.nn.Linear(4, 2)], torch.nn.Linear(4, 2), converts_dtype=False)
    """
    student_dtypes = {p.dtype for p in student.parameters() if p.is_floating_point()}
    meta_accepted = weights_from_rank0 and dist.get_global_rank() != 0
    for i, teacher in enumerate(teachers):
        for name, tensor in [*teacher.named_parameters(), *teacher.named_buffers()]:
            if tensor.is_meta and not meta_accepted:
                raise ValueError(
                    f'teachers[{i}] ({type(teacher).__name__}) has tensors on the meta device (e.g. {name!r}): it '
                    'holds no weights. Load them before training (e.g. teacher.load_state_dict(weights, '
                    'assign=True)), or pass teachers={checkpoint_path: teacher} to load a checkpoint. (Under FSDP, '
                    'with TeacherInference(shard=True), only ranks other than 0 may hold a meta teacher.)'
                )
        if converts_dtype or torch.float64 in student_dtypes:
            continue
        wide = next((name for name, p in teacher.named_parameters() if p.dtype == torch.float64), None)
        if wide is not None:
            raise ValueError(
                f'teachers[{i}] ({type(teacher).__name__}) has float64 parameters (e.g. {wide!r}) but the student '
                'and its batches are not float64, so its first layer would refuse them. Convert the teacher first '
                '(teacher.float()), or run it on a converted copy with TeacherInference(dtype=torch.float32).'
            )


def refuse_shared_parameters(teachers: Sequence[nn.Module], student: nn.Module) -> None:
    """Refuse a teacher that is the student or shares a parameter with it (it would be trained, or frozen, too).

    Raises:
        ValueError: Naming the teacher, and how to make a separate copy.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.teachers import refuse_shared_parameters

            student = torch.nn.Linear(4, 2)
            refuse_shared_parameters([torch.nn.Linear(4, 2)], student)
            try:
                refuse_shared_parameters([student], student)
            except ValueError as e:
                assert 'teachers[0] shares parameters' in str(e)
    """
    student_parameters = {id(p) for p in student.parameters()}
    for i, teacher in enumerate(teachers):
        if teacher is student or any(id(p) in student_parameters for p in teacher.parameters()):
            raise ValueError(
                f'teachers[{i}] shares parameters with the student being trained; a teacher must be a separate, '
                'fixed model (copy it with copy.deepcopy if it starts from the same weights).'
            )


def teacher_output(
    teacher: Union[nn.Module, TeacherRunner], batch: Any, *, input_key: Optional[Key] = None, index: int = 0
) -> Any:
    """One teacher's whole output on ``batch``, for a caller that needs more than the logits
    :func:`teacher_logits` reads from it (timing the forward pass, a dict of several heads).

    The teacher is run as :func:`teacher_logits` runs each of its teachers: in eval mode, a
    :class:`TeacherRunner` on inputs adapted to its options, and a failing forward pass said again naming the
    teacher, the batch it received and ``input_key``. Gradients and precision are the caller's.

    Args:
        teacher (nn.Module | TeacherRunner): The (frozen, placed) teacher.
        batch (Any): The batch the student received.
        input_key (int | str | Callable, optional): Chooses the teacher's input, as in
            :func:`~composer_kd.models.outputs.run_teacher`. Default: ``None``.
        index (int, optional): The teacher's index among all of them, for the error message. Default: ``0``.

    Returns:
        Any: What the teacher's forward pass returned.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.teachers import teacher_output

            teacher = torch.nn.Linear(4, 3)
            inputs = torch.randn(2, 4)
            with torch.no_grad():
                assert torch.equal(teacher_output(teacher, (inputs, None)), teacher(inputs))
    """
    runner = teacher if isinstance(teacher, TeacherRunner) else None
    module = teacher.module if isinstance(teacher, TeacherRunner) else teacher
    if module.training:
        module.eval()
    inputs = batch if runner is None else runner.inputs(batch)
    try:
        return run_teacher(module, inputs, input_key)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise _attributed(e, index, module, inputs, input_key) from e
    finally:
        release_gathered(module)  # a sharded teacher's root keeps its gathered parameters otherwise
