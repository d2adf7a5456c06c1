"""Step times of distillation against its parts, measured in one process (one allocator setting).

Timed on the same fixed batch, interleaved round by round so that drift in the machine's speed touches all alike:
a Composer step of the student alone, the teacher's forward pass alone, a Composer step with ``Distillation``,
and the same distillation step written as a plain PyTorch loop (plus the plain student step, to separate
Composer's own cost from ours). Two control algorithms (:mod:`benchmarks.controls`) price what Composer itself
charges: one that only adds a loss term, and a minimal hand-written distillation algorithm, the floor for any.

Offline distillation is timed apart: a Composer step with ``Distillation(teacher_cache=TeacherCache())`` once the
cache holds the batch (the warm-up steps record it, as a first epoch would), against a student-only step fed by
the same kind of DataLoader (over the batch's rows, one batch per epoch), the cache's without the example index.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from composer import Callback
from torch.utils.data import DataLoader, Dataset

from benchmarks.controls import LossTermAlgorithm, MinimalKDAlgorithm
from benchmarks.pairs import Pair, plain_step, student_trainer, to_device
from composer_kd import Distillation, IndexedDataset, KLDivergence, TeacherCache, TeacherInference

TEMPERATURE = 4.0


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Wall time from BATCH_START to BATCH_END of every batch: forward, loss, backward and optimizer step."""

    def __init__(self, device: str):
        self.device, self.times, self._start = device, [], 0.0

    def batch_start(self, state, logger):
        _sync(self.device)
        self._start = time.perf_counter()

    def batch_end(self, state, logger):
        _sync(self.device)
        self.times.append(time.perf_counter() - self._start)


class BatchRows(Dataset):
    """The rows of one batch as a dataset: a DataLoader over it rebuilds the batch, one batch per epoch."""

    def __init__(self, batch: Any):
        self.batch = batch

    def __len__(self) -> int:
        first = next(iter(self.batch.values())) if isinstance(self.batch, dict) else self.batch[0]
        return len(first)

    def __getitem__(self, i: int) -> Any:
        if isinstance(self.batch, dict):
            return {k: v[i] for k, v in self.batch.items()}
        return tuple(v[i] for v in self.batch)


def _composer_runner(
    pair: Pair, algorithms: list, device: str, total_steps: int, dataset: Dataset | None = None
) -> Callable[[int], list[float]]:
    timer = StepTimer(device)
    loader = None if dataset is None else DataLoader(dataset, batch_size=pair.labels(pair.batch).shape[0])
    trainer = student_trainer(pair, algorithms, device, total_steps, train_dataloader=loader, callbacks=[timer])

    def run(steps: int) -> list[float]:
        before = len(timer.times)
        trainer.fit(duration=f'{steps}ba')
        return timer.times[before:]

    return run


def _timed_loop(step: Callable[[], None], device: str) -> Callable[[int], list[float]]:
    def run(steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        return times

    return run


def measure(
    pair: Pair,
    device: str = 'cpu',
    warmup: int = 3,
    steps: int = 10,
    rounds: int = 3,
    compile_teacher: bool = True,
    cache_only: bool = False,
) -> dict[str, Any]:
    """Median step times (seconds) of each variant, with every sample kept.

    With ``cache_only``, only the variants the cache's figures need: student and KD steps, with and without it.
    """
    total = warmup + steps * rounds
    teacher = copy.deepcopy(pair.teacher).to(device).eval().requires_grad_(False)
    batch = to_device(pair.batch, device)

    def teacher_forward() -> None:
        with torch.no_grad():
            pair.teacher_forward(teacher, batch)

    def distillation(inference: TeacherInference | None = None) -> Distillation:
        return Distillation(
            copy.deepcopy(pair.teacher),
            KLDivergence(temperature=TEMPERATURE),
            org_loss_weight=0.5,
            kd_loss_weight=0.5,
            teacher_inference=inference,
        )

    variants = {
        'student_step': _composer_runner(pair, [], device, total),
        'kd_step': _composer_runner(pair, [distillation()], device, total),
        'loss_term_algorithm_step': _composer_runner(pair, [LossTermAlgorithm()], device, total),
        'minimal_kd_algorithm_step': _composer_runner(pair, [MinimalKDAlgorithm(pair, TEMPERATURE)], device, total),
        'teacher_forward': _timed_loop(teacher_forward, device),
        'plain_student_step': _timed_loop(plain_step(pair, device, False, TEMPERATURE), device),
        'plain_kd_step': _timed_loop(plain_step(pair, device, True, TEMPERATURE), device),
    }
    timed_options = pair.time_teacher_options and not cache_only
    if cache_only:
        variants = {name: variants[name] for name in ('student_step', 'kd_step')}
    if timed_options:
        options = TeacherInference(dtype=torch.bfloat16)
        variants['kd_step_bf16_teacher'] = _composer_runner(pair, [distillation(options)], device, total)
    if timed_options and pair.name == 'vision':
        options = TeacherInference(channels_last=True)
        variants['kd_step_channels_last_teacher'] = _composer_runner(pair, [distillation(options)], device, total)
    if compile_teacher and timed_options:
        options = TeacherInference(compile=True)
        variants['kd_step_compiled_teacher'] = _composer_runner(pair, [distillation(options)], device, total)
    if warmup < 1:
        raise ValueError('warmup must be >= 1: the cached variant records the batch in its first step.')
    cached = Distillation(
        copy.deepcopy(pair.teacher), KLDivergence(temperature=TEMPERATURE), 0.5, 0.5, teacher_cache=TeacherCache()
    )
    teacher_calls = [0]
    cached.teacher_modules[0].register_forward_hook(lambda *_: teacher_calls.__setitem__(0, teacher_calls[0] + 1))
    rows = BatchRows(pair.batch)
    variants['student_step_loader'] = _composer_runner(pair, [], device, total, dataset=rows)
    variants['cached_kd_step'] = _composer_runner(pair, [cached], device, total, dataset=IndexedDataset(rows))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run(warmup)
    teacher_calls[0] = 0  # from here on the cache holds every example
    for _ in range(rounds):
        for name, run in variants.items():
            samples[name].extend(run(steps))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        'pair': pair.name,
        'description': pair.description,
        'repeats': {'warmup': warmup, 'steps_per_round': steps, 'rounds': rounds},
        'median_seconds': medians,
        'ratios': ratios(medians),
        'samples': samples,
        'cached_teacher_calls_timed': teacher_calls[0],
    }


def ratios(m: dict[str, float]) -> dict[str, float]:
    """The figures the table reports, each a ratio of medians from one run (those whose variants were timed)."""

    def ratio(numerator: str, *denominator: str) -> float | None:
        if numerator not in m or any(key not in m for key in denominator):
            return None
        return m[numerator] / sum(m[key] for key in denominator)

    figures = {
        f'speed-up of kd step, {option} teacher': ratio('kd_step', f'kd_step_{option.replace(" ", "_")}_teacher')
        for option in ('bf16', 'channels last', 'compiled')
    }
    figures |= {
        'cached kd (cache hit) / student, same loader': ratio('cached_kd_step', 'student_step_loader'),
        'cached kd (cache hit) / kd': ratio('cached_kd_step', 'kd_step'),
        # The same work timed twice (only the DataLoader differs, outside the timed window): the noise floor.
        'control: student, loader / student, list': ratio('student_step_loader', 'student_step'),
        'kd / (student + teacher)': ratio('kd_step', 'student_step', 'teacher_forward'),
        'kd / student': ratio('kd_step', 'student_step'),
        'kd / plain kd loop': ratio('kd_step', 'plain_kd_step'),
        # What Composer itself charges an algorithm that adds a loss term (the noise floor is the control above).
        'control: loss-term algorithm / student': ratio('loss_term_algorithm_step', 'student_step'),
        # The floor for any distillation algorithm in Composer: the plain formula, no checks, no options.
        'kd / minimal KD algorithm': ratio('kd_step', 'minimal_kd_algorithm_step'),
        'student / plain student loop': ratio('student_step', 'plain_student_step'),
        'plain kd / (plain student + teacher)': ratio('plain_kd_step', 'plain_student_step', 'teacher_forward'),
    }
    return {name: value for name, value in figures.items() if value is not None}
