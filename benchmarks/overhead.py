"""Step times of distillation against its parts, measured in one process (one allocator setting).

Four things are timed on the same fixed batch, interleaved round by round so that drift in the machine's speed
touches all alike: a Composer step of the student alone, the teacher's forward pass alone, a Composer step with
``Distillation``, and the same distillation step written as a plain PyTorch loop (plus the plain student step,
to separate Composer's own cost from ours).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from composer import Callback, Trainer

from benchmarks.pairs import Pair, plain_kd_loss
from composer_kd import Distillation, KLDivergence, TeacherInference

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


def _to(batch: Any, device: str) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return tuple(v.to(device) for v in batch)


def _composer_runner(pair: Pair, algorithms: list, device: str, total_steps: int) -> Callable[[int], list[float]]:
    student = copy.deepcopy(pair.student)
    timer = StepTimer(device)
    batch_size = pair.labels(pair.batch).shape[0]
    trainer = Trainer(
        model=student,
        train_dataloader=[pair.batch] * total_steps,
        device_train_microbatch_size=batch_size,
        optimizers=torch.optim.SGD(student.parameters(), lr=0.01),
        algorithms=algorithms,
        callbacks=[timer],
        device='gpu' if device == 'cuda' else 'cpu',
        precision='fp32',
        progress_bar=False,
        log_to_console=False,
        max_duration=f'{total_steps}ba',
    )

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
    pair: Pair, device: str = 'cpu', warmup: int = 3, steps: int = 10, rounds: int = 3, compile_teacher: bool = True
) -> dict[str, Any]:
    """Median step times (seconds) of each variant, with every sample kept."""
    total = warmup + steps * rounds
    teacher = copy.deepcopy(pair.teacher).to(device).eval().requires_grad_(False)
    batch = _to(pair.batch, device)

    plain_student = copy.deepcopy(pair.student).to(device)
    plain_optimizer = torch.optim.SGD(plain_student.parameters(), lr=0.01)

    def plain_step(with_teacher: bool) -> Callable[[], None]:
        def step() -> None:
            logits = pair.student_forward(plain_student, batch)
            if with_teacher:
                with torch.no_grad():
                    teacher_logits = pair.teacher_forward(teacher, batch)
                loss = plain_kd_loss(logits, teacher_logits, pair.labels(batch), TEMPERATURE)
            else:
                loss = torch.nn.functional.cross_entropy(logits, pair.labels(batch))
            loss.backward()
            plain_optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)

        return step

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
        'teacher_forward': _timed_loop(teacher_forward, device),
        'plain_student_step': _timed_loop(plain_step(False), device),
        'plain_kd_step': _timed_loop(plain_step(True), device),
        'kd_step_bf16_teacher': _composer_runner(
            pair, [distillation(TeacherInference(dtype=torch.bfloat16))], device, total
        ),
    }
    if pair.name == 'vision':
        options = TeacherInference(channels_last=True)
        variants['kd_step_channels_last_teacher'] = _composer_runner(pair, [distillation(options)], device, total)
    if compile_teacher:
        options = TeacherInference(compile=True)
        variants['kd_step_compiled_teacher'] = _composer_runner(pair, [distillation(options)], device, total)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run(warmup)
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
    }


def ratios(m: dict[str, float]) -> dict[str, float]:
    """The figures the table reports, each a ratio of medians from one run."""
    speedups = {
        f'speed-up of kd step, {option} teacher': m['kd_step'] / m[f'kd_step_{option.replace(" ", "_")}_teacher']
        for option in ('bf16', 'channels last', 'compiled')
        if f'kd_step_{option.replace(" ", "_")}_teacher' in m
    }
    return speedups | {
        'kd / (student + teacher)': m['kd_step'] / (m['student_step'] + m['teacher_forward']),
        'kd / student': m['kd_step'] / m['student_step'],
        'kd / plain kd loop': m['kd_step'] / m['plain_kd_step'],
        'student / plain student loop': m['student_step'] / m['plain_student_step'],
        'plain kd / (plain student + teacher)': m['plain_kd_step'] / (m['plain_student_step'] + m['teacher_forward']),
    }
