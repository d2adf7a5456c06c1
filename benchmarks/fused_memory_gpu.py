"""The fused output layer + distillation loss on a GPU, at Liger-Kernel's published shapes: tokens 8192, hidden
4096, vocabulary 128,256, bf16 weights and hidden states. Prints the extra peak memory and step time of the fused
path over the unfused one and, when ``liger_kernel`` imports, Liger's fused linear JSD at the same shapes (its
``beta`` at 0.5 and without labels: a loss between distributions only, so its figures are beside ours, not equal
work; ours adds the student's cross-entropy).

Peak memory is PyTorch's ``max_memory_allocated`` over what is allocated before the step (the inputs and the
gradients both variants produce), so it is the step's own and independent of the caching allocator's reserve.

Run::

    python -m benchmarks.fused_memory_gpu                     # on a CUDA machine
    python -m benchmarks.fused_memory_gpu --device cpu --quick   # a tiny CPU run that checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.fused_memory import VARIANTS, make_inputs, measure, ratios

TEMPERATURE = 2.0


def liger_step(inputs: dict, liger_loss) -> torch.Tensor:
    loss = liger_loss(inputs['hidden'], inputs['weight'], inputs['teacher_hidden'], inputs['teacher_weight'])
    loss.backward()
    return loss.detach()


def measure_liger(tokens: int, hidden: int, vocab: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    """Liger-Kernel's ``LigerFusedLinearJSD`` at the same shapes, measured as :func:`measure` measures ours."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as error:  # not installed, or no Triton on this machine
        return {'variant': 'liger', 'skipped': f'liger_kernel does not import: {error}'}
    liger_loss = LigerFusedLinearJSD(jsd_beta=0.5, temperature=TEMPERATURE)
    inputs = make_inputs(tokens, hidden, vocab, device, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    times, value = [], None
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        value = liger_step(inputs, liger_loss)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        'variant': 'liger',
        'shape': {'tokens': tokens, 'hidden': hidden, 'vocab': vocab},
        'dtype': str(dtype).replace('torch.', ''),
        'extra_peak_bytes': torch.cuda.max_memory_allocated() - baseline,
        'median_seconds': statistics.median(times[1:]) if repeats else times[0],
        'loss': float(value),
        'repeats': repeats,
    }


def run(args: argparse.Namespace) -> dict:
    dtype = torch.bfloat16 if args.device == 'cuda' else torch.float32
    results = {}
    for variant in VARIANTS:
        results[variant] = measure(
            variant, args.tokens, args.hidden, args.vocab, args.device, dtype, args.repeats, args.chunk_size
        )
        gc.collect()
        if args.device == 'cuda':
            torch.cuda.empty_cache()
    report = {
        'device': args.device,
        'allocators': {'torch': {**results, 'ratios': ratios(results['unfused'], results['fused'])}},
    }
    if args.device == 'cuda':
        liger = measure_liger(args.tokens, args.hidden, args.vocab, args.device, dtype, args.repeats)
        report['liger'] = liger
    return report


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command's settings (Liger-Kernel's shapes unless given), the tiny ones with ``--quick``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
    parser.add_argument('--tokens', type=int, default=8192)
    parser.add_argument('--hidden', type=int, default=4096)
    parser.add_argument('--vocab', type=int, default=128_256)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--chunk-size', type=int, default=1024, help='tokens per chunk of the fused path')
    parser.add_argument('--quick', action='store_true', help='a tiny setting, to check the script runs')
    parser.add_argument('--output', type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.repeats, args.chunk_size = 64, 16, 500, 1, 16
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('No CUDA device: run with --device cpu --quick to check the script, or on a GPU machine.')
    report = run(args)
    mib = 2**20
    for variant in VARIANTS:
        r = report['allocators']['torch'][variant]
        peak, step = r['extra_peak_bytes'] / mib, r['median_seconds'] * 1e3
        print(f'{variant:8s} extra peak {peak:10.1f} MiB, step {step:9.2f} ms')
    for name, value in report['allocators']['torch']['ratios'].items():
        print(f'{name}: {value:.4g}')
    if 'liger' in report:
        r = report['liger']
        if 'skipped' in r:
            print(f'liger: {r["skipped"]}')
        else:
            peak, step = r['extra_peak_bytes'] / mib, r['median_seconds'] * 1e3
            print(f'liger    extra peak {peak:10.1f} MiB, step {step:9.2f} ms')
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == '__main__':
    main()
