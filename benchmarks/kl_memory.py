"""Peak memory and time of the token-level KL loss, forward and backward: naive against chunked.

Each variant runs in its own process, so the operating system's high-water mark of resident memory (CPU) or
PyTorch's peak allocation (CUDA) belongs to it alone. "Extra peak" is the peak minus the memory held once the
inputs exist, so the logits themselves (and their gradient, which both variants must produce) are counted the same
way for both.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
import torch.nn.functional as F

from composer_kd import chunked_kl_divergence

TEMPERATURE = 2.0


def naive(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    t = TEMPERATURE
    return F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction='batchmean') * t * t


def chunked(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # batchmean over [batch, seq, vocab] divides by the batch; ours averages over tokens: rescale to compare.
    return chunked_kl_divergence(student, teacher, TEMPERATURE) * student.shape[1]


def _peak_bytes(device: str) -> int:
    if device == 'cuda':
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(variant: str, batch: int, seq: int, vocab: int, device: str, repeats: int = 3) -> dict:
    loss_fn = {'naive': naive, 'chunked': chunked}[variant]
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(batch, seq, vocab, generator=generator).to(device).requires_grad_()
    teacher = torch.randn(batch, seq, vocab, generator=generator).to(device)
    student.grad = torch.zeros_like(student)  # the gradient both variants must produce, allocated up front
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_bytes(device) if device == 'cuda' else _current_rss()
    times, value = [], None
    for _ in range(repeats):
        student.grad.zero_()
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(student, teacher)
        loss.backward()
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        value = loss.item()
    return {
        'variant': variant,
        'shape': [batch, seq, vocab],
        'extra_peak_bytes': _peak_bytes(device) - baseline,
        'median_seconds': statistics.median(times),
        'value': value,
        'grad_norm': student.grad.norm().item(),
        'repeats': repeats,
    }


def _current_rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()
