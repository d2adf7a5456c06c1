"""How much faster the student answers than its teacher: both timed on one batch, on a machine others may share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from composer_kd.outputs import run_teacher

__all__ = ['example_count', 'first_examples', 'measure_speedup']


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
            from composer_kd.speed import example_count

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
            from composer_kd.speed import first_examples

            head = first_examples((torch.arange(10), {'mask': torch.ones(10, 2)}), 3)
            assert head[0].tolist() == [0, 1, 2] and head[1]['mask'].shape == (3, 2)
    """
    return _map_tensors(batch, lambda t: t[:n] if t.ndim else t)


def _timer(model: nn.Module, batch: Any) -> Callable[[], float]:
    """A function timing one forward pass of ``model`` on ``batch`` (moved once to the model's device).

    A tensor batch goes to the network inside a ``ComposerClassifier`` (``.module``) or to the model itself;
    any other batch is given to the model the way a teacher receives the student's batch
    (:func:`~composer_kd.outputs.run_teacher`), which works for every kind of model this package takes.
    """
    device = next(model.parameters()).device
    batch = _map_tensors(batch, lambda t: t.to(device))
    if isinstance(batch, torch.Tensor):
        network = getattr(model, 'module', model)

        def forward() -> Any:
            return network(batch)
    else:

        def forward() -> Any:
            return run_teacher(model, batch)

    def timed() -> float:
        start = time.perf_counter()
        forward()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)  # time the work, not only its launch
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
            from composer_kd.speed import measure_speedup

            wide = torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10))
            result = measure_speedup(wide, torch.nn.Linear(64, 10), torch.randn(128, 64), repeats=4, rounds=2)
            assert set(result) == {'teacher_us_per_example', 'student_us_per_example', 'speedup'}
    """
    models = {'teacher': teacher, 'student': student}
    modes = {name: [(m, m.training) for m in model.modules()] for name, model in models.items()}
    timings: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            calls = {}
            for name, model in models.items():
                model.eval()
                calls[name] = _timer(model, inputs)
            for _ in range(rounds):
                for name, call in calls.items():
                    call(), call()
                    timings[name] += [call() for _ in range(max(1, repeats // rounds))]
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
