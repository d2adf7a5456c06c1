"""Peak memory and time of a language model's output layer + distillation loss, one training step: unfused
(``[tokens, vocabulary]`` logits of student and teacher, cross-entropy and KL on them) against fused
(:func:`composer_kd.losses.fused.fused_linear_distillation`, a chunk of tokens at a time).

A step is what the output-layer part of a training step costs: the student's projection, the teacher's (without
gradients), the student's cross-entropy plus the forward KL at ``T = 2``, and the backward pass to the student's
final hidden states and output weight. The inputs (hidden states, weights) and the gradients both variants must
produce (``.grad`` of hidden states and weight) exist before the step; "extra peak" is what the step adds on top.

CPU: each variant runs in a fresh process, and its extra peak is the growth of the operating system's high-water
mark of resident memory (``ru_maxrss``) over the resident memory held once the inputs exist, so PyTorch's
allocator plays no part. glibc's allocator returns large freed blocks to the operating system unless its
thresholds are raised; both settings are measured and named (``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` raised to 4 GiB changes the time a step spends re-faulting pages, hardly the peak).
CUDA: one process, PyTorch's ``max_memory_allocated`` over ``memory_allocated`` before the step.

Run::

    python -m benchmarks.fused_memory                 # CPU: tokens 2048, hidden 1024, vocabulary 32,000
    python -m benchmarks.fused_memory --vocab 128256  # the large-vocabulary point
    python -m benchmarks.fused_memory --quick         # a tiny setting, as the tests run it
    python -m benchmarks.fused_memory_gpu             # CUDA at Liger-Kernel's shapes, bf16 (and Liger's loss)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from composer_kd.losses import kl_divergence
from composer_kd.losses.fused import default_chunk_size, fused_linear_distillation

TEMPERATURE = 2.0
ROOT = Path(__file__).resolve().parents[1]
ALLOCATORS = {
    'glibc default': {},
    'glibc thresholds raised (4 GiB)': {'MALLOC_MMAP_THRESHOLD_': str(4 << 30), 'MALLOC_TRIM_THRESHOLD_': str(4 << 30)},
}
VARIANTS = ('unfused', 'fused')


def make_inputs(tokens: int, hidden: int, vocab: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Student and teacher hidden states and output weights (teacher as wide as the student), and labels."""
    generator = torch.Generator().manual_seed(seed)
    scale = hidden**-0.5
    inputs = {
        'hidden': torch.randn(tokens, hidden, generator=generator),
        'weight': torch.randn(vocab, hidden, generator=generator) * scale,
        'teacher_hidden': torch.randn(tokens, hidden, generator=generator),
        'teacher_weight': torch.randn(vocab, hidden, generator=generator) * scale,
    }
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::7] = -100  # some positions ignored, as padding and prompts are
    inputs['labels'] = labels.to(device)
    inputs['hidden'].requires_grad_()
    inputs['weight'].requires_grad_()
    # The gradients both variants must produce, allocated up front: accumulated into, not counted as extra.
    inputs['hidden'].grad = torch.zeros_like(inputs['hidden'])
    inputs['weight'].grad = torch.zeros_like(inputs['weight'])
    return inputs


def unfused_step(inputs: dict, chunk_size: Optional[int]) -> torch.Tensor:
    logits = inputs['hidden'] @ inputs['weight'].T
    with torch.no_grad():
        teacher_logits = inputs['teacher_hidden'] @ inputs['teacher_weight'].T
    ce = F.cross_entropy(logits.float(), inputs['labels'], ignore_index=-100)
    loss = ce + kl_divergence(logits, teacher_logits, TEMPERATURE)
    loss.backward()
    return loss.detach()


def fused_step(inputs: dict, chunk_size: Optional[int]) -> torch.Tensor:
    losses = fused_linear_distillation(
        inputs['hidden'],
        inputs['weight'],
        (inputs['teacher_hidden'], inputs['teacher_weight']),
        labels=inputs['labels'],
        loss_fn='kl',
        temperature=TEMPERATURE,
        chunk_size=chunk_size,
    )
    losses.total.backward()
    return losses.total.detach()


STEPS = {'unfused': unfused_step, 'fused': fused_step}


def _current_rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(
    variant: str,
    tokens: int,
    hidden: int,
    vocab: int,
    device: str = 'cpu',
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    chunk_size: Optional[int] = None,
) -> dict:
    """One variant's extra peak memory (first step) and median step time (the steps after it)."""
    step = STEPS[variant]
    inputs = make_inputs(tokens, hidden, vocab, device, dtype)
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _current_rss()
    times, value = [], None
    for _ in range(repeats + 1):
        for tensor in (inputs['hidden'].grad, inputs['weight'].grad):
            tensor.zero_()
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = step(inputs, chunk_size)
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == 'cuda' else _max_rss()
    return {
        'variant': variant,
        'shape': {'tokens': tokens, 'hidden': hidden, 'vocab': vocab},
        'dtype': str(dtype).replace('torch.', ''),
        'extra_peak_bytes': peak - baseline,
        'median_seconds': statistics.median(times[1:]) if repeats else times[0],
        'loss': float(value),
        'grad_weight_norm': float(inputs['weight'].grad.float().norm()),
        'repeats': repeats,
        'chunk_size': (chunk_size or default_chunk_size(vocab)) if variant == 'fused' else None,
    }


def _child(variant: str, args: argparse.Namespace, allocator_env: dict) -> dict:
    """``measure`` in a fresh interpreter (its own high-water mark), under the allocator settings given."""
    command = [
        sys.executable,
        '-m',
        'benchmarks.fused_memory',
        '--child',
        variant,
        '--tokens',
        str(args.tokens),
        '--hidden',
        str(args.hidden),
        '--vocab',
        str(args.vocab),
        '--repeats',
        str(args.repeats),
        '--threads',
        str(args.threads),
    ]
    if args.chunk_size:
        command += ['--chunk-size', str(args.chunk_size)]
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': str(args.threads), **allocator_env}
    for name in ALLOCATORS['glibc thresholds raised (4 GiB)']:
        if name not in allocator_env:
            env.pop(name, None)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f'{variant} failed:\n{result.stderr[-3000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratios(unfused: dict, fused: dict) -> dict:
    return {
        'extra peak memory, fused / unfused': fused['extra_peak_bytes'] / max(unfused['extra_peak_bytes'], 1),
        'step time, fused / unfused': fused['median_seconds'] / unfused['median_seconds'],
        'loss relative difference': abs(fused['loss'] - unfused['loss']) / abs(unfused['loss']),
    }


def run_cpu(args: argparse.Namespace) -> dict:
    """Both variants under each allocator setting; the fused one also at each ``--more-chunk-sizes``."""
    report = {'device': 'cpu', 'threads': args.threads, 'allocators': {}}
    for allocator, env in ALLOCATORS.items():
        results = {variant: _child(variant, args, env) for variant in VARIANTS}
        results['ratios'] = ratios(results['unfused'], results['fused'])
        for chunk_size in args.more_chunk_sizes:
            other = _child('fused', argparse.Namespace(**{**vars(args), 'chunk_size': chunk_size}), env)
            results[f'fused, chunk {chunk_size}'] = other
            results[f'ratios, chunk {chunk_size}'] = ratios(results['unfused'], other)
        report['allocators'][allocator] = results
    return report


def print_report(report: dict) -> None:
    mib = 2**20
    for allocator, results in report['allocators'].items():
        shape = results['unfused']['shape']
        print(
            f'{report["device"]}, {results["unfused"]["dtype"]}, tokens {shape["tokens"]}, hidden {shape["hidden"]}, '
            f'vocabulary {shape["vocab"]}, {allocator}:'
        )
        for variant, r in results.items():
            if variant.startswith('ratios'):
                continue
            label = f'{variant} (chunk {r["chunk_size"]})' if variant == 'fused' else variant
            peak, step = r['extra_peak_bytes'] / mib, r['median_seconds'] * 1000
            detail = f'median of {r["repeats"]}, loss {r["loss"]:.6f}'
            print(f'  {label}: extra peak {peak:.1f} MiB, step {step:.1f} ms ({detail})')
        for key, values in results.items():
            if key.startswith('ratios'):
                for name, value in values.items():
                    print(f'  {name}{key[6:]}: {value:.4g}')


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tokens', type=int, default=2048)
    parser.add_argument('--hidden', type=int, default=1024)
    parser.add_argument('--vocab', type=int, default=32_000)
    parser.add_argument('--repeats', type=int, default=3, help='timed steps after the first (which is measured)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--chunk-size', type=int, default=None, help='tokens per chunk (default: the default)')
    parser.add_argument(
        '--more-chunk-sizes', type=int, nargs='*', default=[], help='also measure the fused path at these chunk sizes'
    )
    parser.add_argument('--quick', action='store_true', help='a tiny setting, to check the script runs')
    parser.add_argument('--output', type=Path, default=None, help='write the report as JSON here')
    parser.add_argument('--child', choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(
            json.dumps(
                measure(
                    args.child, args.tokens, args.hidden, args.vocab, repeats=args.repeats, chunk_size=args.chunk_size
                )
            )
        )
        return {}
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.repeats = 64, 16, 500, 1
    report = run_cpu(args)
    print_report(report)
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == '__main__':
    main()
