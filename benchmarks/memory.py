"""Peak memory of a distillation run against a student-only run plus one batch of teacher activations.

Each variant runs in its own process and reports how far its peak rose above the memory held just before it
started: on CUDA from PyTorch's allocator statistics, on CPU from the kernel's resident-set high-water mark, which
is reset first (``/proc/self/clear_refs``). The teacher's weights are on the device before every measurement
starts, in every variant, so they cancel out of the comparison and are reported on their own.

The goal: ``kd run extra peak <= student run extra peak + teacher activations of one batch``.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.pairs import Pair, student_trainer, to_device
from composer_kd import Distillation, KLDivergence

VARIANTS = ('student_run', 'kd_run', 'teacher_forward')


def _resident_bytes() -> int:
    with open('/proc/self/status') as f:
        fields = dict(line.split(':', 1) for line in f)
    return int(fields['VmRSS'].split()[0]) * 1024


def _high_water_bytes() -> int:
    with open('/proc/self/status') as f:
        fields = dict(line.split(':', 1) for line in f)
    return int(fields['VmHWM'].split()[0]) * 1024


def _reset_peak(device: str) -> int:
    """Forget the peak so far; returns the memory held now, from which the next peak is measured."""
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current resident set
    return _resident_bytes()


def _peak(device: str) -> int:
    if device == 'cuda':
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _high_water_bytes()


def measure(pair: Pair, variant: str, device: str = 'cpu', steps: int = 3) -> dict[str, Any]:
    """Extra peak bytes of one variant: a Composer run of ``steps`` batches, or one teacher forward pass."""
    if variant not in VARIANTS:
        raise ValueError(f'variant must be one of {VARIANTS}, got {variant!r}.')
    teacher = pair.teacher.to(device).eval().requires_grad_(False)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    batch = to_device(pair.batch, device)
    if variant == 'teacher_forward':
        before = _reset_peak(device)
        with torch.no_grad():
            pair.teacher_forward(teacher, batch)
    else:
        algorithms = []
        if variant == 'kd_run':
            algorithms = [Distillation(teacher, KLDivergence(temperature=4.0), org_loss_weight=0.5, kd_loss_weight=0.5)]
        trainer = student_trainer(pair, algorithms, device, steps)
        before = _reset_peak(device)
        trainer.fit()
    return {
        'pair': pair.name,
        'variant': variant,
        'extra_peak_bytes': _peak(device) - before,
        'teacher_weight_bytes': weight_bytes,
        'steps': steps,
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The figures of one pair, from the three variants' results."""
    extra = {name: result['extra_peak_bytes'] for name, result in results.items()}
    budget = extra['student_run'] + extra['teacher_forward']
    return {
        'kd run extra peak / (student run extra peak + teacher activations)': extra['kd_run'] / max(budget, 1),
        'kd run extra peak (MiB)': extra['kd_run'] / 2**20,
        'student run extra peak (MiB)': extra['student_run'] / 2**20,
        'teacher activations, one batch (MiB)': extra['teacher_forward'] / 2**20,
        'teacher weights (MiB)': results['kd_run']['teacher_weight_bytes'] / 2**20,
    }
