"""Inference timing on one batch, on a machine others may share: how much faster the student answers than its
teacher, and which opt-in teacher options (:class:`~composer_kd.models.teachers.TeacherInference`) speed the teacher up
here."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from composer_kd.models.outputs import Key, run_teacher
from composer_kd.models.teachers import TeacherInference, TeacherRunner, teacher_logits, teacher_output

__all__ = ['example_count', 'first_examples', 'measure_speedup', 'measure_teacher_inference']


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def example_count(batch: Any) -> int:
    """The number of examples in ``batch``: the leading dimension of its first tensor.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.speed import example_count

            assert example_count({'inputs': torch.zeros(5, 3), 'labels': torch.zeros(5)}) == 5
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        try:
            return example_count(value)
        except TypeError:
            continue
    raise TypeError(f'No tensor in a batch of type {type(batch).__name__} to count examples by.')


def first_examples(batch: Any, n: int) -> Any:
    """The first ``n`` examples of ``batch`` (a tensor, or tuples, lists and dicts of tensors), as views.

    Example:
        .. testcode::

            import torch
            from composer_kd.models.speed import first_examples

            head = first_examples((torch.arange(10), {'mask': torch.ones(10, 2)}), 3)
            assert head[0].tolist() == [0, 1, 2] and head[1]['mask'].shape == (3, 2)
    """
    return _map_tensors(batch, lambda t: t[:n] if t.ndim else t)


def _timer(model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any]) -> Callable[[], float]:
    """A function timing one forward pass of ``model`` on ``batch`` (moved once to the model's device).

    A tensor batch goes to the network inside a ``ComposerClassifier`` (``.module``) or to the model itself;
    any other batch is given to the model the way a teacher receives the student's batch. ``run`` makes the call:
    :func:`~composer_kd.models.teachers.teacher_output` for a teacher,
    :func:`~composer_kd.models.outputs.run_teacher` for the student.
    """
    device = next(model.parameters()).device
    batch = _map_tensors(batch, lambda t: t.to(device))
    network = getattr(model, 'module', model) if isinstance(batch, torch.Tensor) else model
    return _timed(lambda: run(network, batch), device)


def _timed(call: Callable[[], Any], device: torch.device) -> Callable[[], float]:
    """``call`` made to return how long it took, waiting on a GPU for the work itself, not only its launch."""

    def timed() -> float:
        start = time.perf_counter()
        call()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def measure_speedup(
    teacher: nn.Module, student: nn.Module, inputs: Any, repeats: int = 30, rounds: int = 3
) -> dict[str, float]:
    """Time both models' inference on ``inputs``, in alternating blocks so a busy machine slows both alike.

    Each model runs in eval mode under ``torch.inference_mode`` on the whole batch ``inputs``. In each of
    ``rounds`` rounds the teacher, then the student, is called twice to warm up and then timed
    ``repeats // rounds`` times in a row; the medians of all timings are compared. Blocks rather than strict
    alternation keep each model's memory reuse steady: timing the student right after the teacher freed its
    large activations measured it up to 10x slower in some sessions. Every module's train/eval mode is given
    back afterwards.

    Args:
        teacher (nn.Module): The teacher.
        student (nn.Module): The student.
        inputs (Any): A batch both take: an input tensor, or a whole batch as the trainer gives it.
        repeats (int, optional): Timings per model. Default: ``30``.
        rounds (int, optional): Blocks per model. Default: ``3``.

    Returns:
        dict[str, float]: ``teacher_us_per_example``, ``student_us_per_example`` and ``speedup`` (teacher time
        over student time).

    Example:
        .. testcode::

            import torch
            from composer_kd.models.speed import measure_speedup

            wide = torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10))
            result = measure_speedup(wide, torch.nn.Linear(64, 10), torch.randn(128, 64), repeats=4, rounds=2)
            assert set(result) == {'teacher_us_per_example', 'student_us_per_example', 'speedup'}
    """
    models = {'teacher': (teacher, teacher_output), 'student': (student, run_teacher)}
    modes = {name: [(m, m.training) for m in model.modules()] for name, (model, _) in models.items()}
    try:
        with torch.inference_mode():
            timers = {}
            for name, (model, run) in models.items():
                model.eval()
                timers[name] = _timer(model, inputs, run)
            timings = _interleaved(timers, repeats, rounds)
    finally:
        for flags in modes.values():
            for module, training in flags:
                module.training = training
    per_example = {name: statistics.median(t) / example_count(inputs) * 1e6 for name, t in timings.items()}
    return {
        'teacher_us_per_example': per_example['teacher'],
        'student_us_per_example': per_example['student'],
        'speedup': per_example['teacher'] / per_example['student'],
    }


def default_candidates(teacher: nn.Module) -> dict[str, TeacherInference]:
    """The options :func:`measure_teacher_inference` tries by default: bf16 weights, channels-last (only for a
    teacher with 2-D convolutions) and ``torch.compile``."""
    candidates = {'bf16': TeacherInference(dtype=torch.bfloat16)}
    if any(isinstance(m, nn.Conv2d) for m in teacher.modules()):
        candidates['channels_last'] = TeacherInference(channels_last=True)
    candidates['compile'] = TeacherInference(compile=True)
    return candidates


def measure_teacher_inference(
    teacher: nn.Module,
    batch: Any,
    candidates: Optional[Mapping[str, TeacherInference]] = None,
    *,
    input_key: Optional[Key] = None,
    logits_key: Optional[Key] = None,
    repeats: int = 20,
    rounds: int = 4,
) -> dict[str, dict[str, float]]:
    """Time the teacher's forward pass as ``Distillation`` runs it, plainly and with each option, on this machine.

    Whether bf16 weights, channels-last layout or ``torch.compile`` make a teacher faster depends on the hardware
    and the model (a bf16 BERT teacher was measured twice as fast on a CPU with AMX, and several times slower on
    one without bf16 units), so :class:`~composer_kd.models.teachers.TeacherInference` leaves them off until they are
    measured to help: this measures them. Each variant runs on its own copy of the teacher (the teacher itself is
    left as it was), in eval mode without gradients, on the teacher's device; they are timed in interleaved
    rounds (two warm-up calls per round, which also absorb compilation) and their medians compared. Each also
    reports how far its logits stray from the plain teacher's.

    Args:
        teacher (nn.Module): The teacher, on the device it will train on.
        batch (Any): A training batch, as the trainer gives it to the student.
        candidates (Mapping[str, TeacherInference], optional): The options to try, by name. Default: bf16 weights,
            channels-last (only for a teacher with 2-D convolutions) and ``torch.compile``.
        input_key (int | str | Callable, optional): As ``Distillation``'s. Default: ``None``.
        logits_key (int | str | Callable, optional): Chooses the logits in the teacher's output, as
            ``Distillation``'s ``teacher_logits_key``. Default: ``None``.
        repeats (int, optional): Timed calls per variant. Default: ``20``.
        rounds (int, optional): Interleaved rounds they are spread over. Default: ``4``.

    Returns:
        dict[str, dict[str, float]]: For ``'plain'`` and each candidate: ``milliseconds`` (median per forward
        pass), ``speedup`` (the plain median over this one's) and ``max_abs_difference`` (the largest difference
        of its logits from the plain teacher's).

    Example:
        .. testcode::

            import torch
            from composer_kd import TeacherInference
            from composer_kd.models.speed import measure_teacher_inference

            teacher = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
            batch = (torch.randn(64, 32), torch.randint(0, 10, (64,)))
            results = measure_teacher_inference(
                teacher, batch, {'bf16': TeacherInference(dtype=torch.bfloat16)}, repeats=4, rounds=2
            )
            assert set(results) == {'plain', 'bf16'} and results['plain']['speedup'] == 1.0
    """
    chosen = default_candidates(teacher) if candidates is None else dict(candidates)
    options = {'plain': TeacherInference(), **chosen}
    device = next(teacher.parameters()).device
    batch = _map_tensors(batch, lambda t: t.to(device))
    runners = {
        name: TeacherRunner(copy.deepcopy(teacher).eval().requires_grad_(False), o) for name, o in options.items()
    }
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name, runner in runners.items():
        runner.prepare()
        # Run as a fit runs it, inputs adapted to each option on every call included.
        calls[name] = lambda runner=runner: teacher_logits([runner], batch, input_key=input_key, logits_key=logits_key)
    with torch.no_grad():
        reference = calls['plain']().float()
        differences = {name: float((call().float() - reference).abs().max()) for name, call in calls.items()}
        timings = _interleaved({name: _timed(call, device) for name, call in calls.items()}, repeats, rounds)
    for runner in runners.values():
        runner.release()
    return _against_plain(timings, differences)


def _against_plain(timings: Mapping[str, list[float]], differences: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Each variant's median time, its speed-up over the ``'plain'`` variant's, and its logits' difference."""
    medians = {name: statistics.median(t) for name, t in timings.items()}
    return {
        name: {
            'milliseconds': medians[name] * 1e3,
            'speedup': medians['plain'] / medians[name],
            'max_abs_difference': differences[name],
        }
        for name in timings
    }


def _interleaved(timers: Mapping[str, Callable[[], float]], repeats: int, rounds: int) -> dict[str, list[float]]:
    """Each timer's timings, taken in ``rounds`` rounds: in each, every timer in turn is called twice to warm up
    and then ``repeats // rounds`` times in a row (at least once), so a busy machine slows each alike."""
    timings: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            timer(), timer()
            timings[name] += [timer() for _ in range(max(1, repeats // rounds))]
    return timings
