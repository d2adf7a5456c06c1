"""The step time of distilling from a stored teacher signal through the fused output layer, against the student's
own fused cross-entropy step, and the unfused signal step for reference: one training step of the output layer.

A step is the output-layer part of a training step: the student's projection of its final hidden states, the
cross-entropy on the labels and (for the distilling variants) the forward KL at ``T = 2`` to the teacher the stored
top-``k`` signal stands for, then the backward pass to the hidden states and the output weight.

* ``alone``: :func:`composer_kd.losses.fused.fused_linear_distillation` with no teacher (the cross-entropy alone,
  a chunk of tokens at a time);
* ``signal, fused``: the same loop fed a :class:`~composer_kd.losses.fused.SignalTeacherChunks` (no ``[tokens,
  vocabulary]`` tensor at all);
* ``signal, unfused``: whole ``[tokens, vocabulary]`` logits, the cross-entropy and
  :func:`composer_kd.losses.signal.signal_kl` on them.

The variants run in turn, one step each per round, so that drift of the shared machine reaches all of them alike;
each figure is the median over the rounds after a first, untimed one. The fused value is checked against the
unfused one in the same run.

Run::

    python -m benchmarks.signal_fused            # tokens 2048, hidden 1024, vocabulary 32,000, k 32
    python -m benchmarks.signal_fused --quick    # a tiny setting, as the tests run it
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from composer_kd.cache import topk_compress
from composer_kd.losses.fused import SignalTeacherChunks, fused_linear_distillation
from composer_kd.losses.signal import signal_kl

VARIANTS = ('alone', 'signal, fused', 'signal, unfused')
TEMPERATURE = 2.0


def make_inputs(tokens: int, hidden: int, vocab: int, k: int, seed: int = 0) -> dict:
    """Hidden states and weight that need gradients, labels, a mask, and a stored signal of a random teacher."""
    generator = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(tokens, vocab, generator=generator) * 3
    values, indices, log_tail = topk_compress(teacher_logits, k)
    del teacher_logits
    return {
        'hidden': (torch.randn(tokens, hidden, generator=generator) / hidden**0.5).requires_grad_(),
        'weight': (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).requires_grad_(),
        'labels': torch.randint(0, vocab, (tokens,), generator=generator),
        'mask': torch.ones(tokens, dtype=torch.bool),
        'signal': (indices, values.float(), log_tail),
    }


def alone_step(inputs: dict, chunk_size: Optional[int]) -> torch.Tensor:
    out = fused_linear_distillation(
        inputs['hidden'], inputs['weight'], None, labels=inputs['labels'], chunk_size=chunk_size
    )
    out.total.backward()
    return out.total.detach()


def fused_signal_step(inputs: dict, chunk_size: Optional[int]) -> torch.Tensor:
    indices, values, log_tail = inputs['signal']
    teacher = SignalTeacherChunks(indices, values, log_tail, inputs['weight'].shape[0])
    out = fused_linear_distillation(
        inputs['hidden'],
        inputs['weight'],
        teacher,
        labels=inputs['labels'],
        kd_mask=inputs['mask'],
        loss_fn='kl',
        temperature=TEMPERATURE,
        chunk_size=chunk_size,
    )
    out.total.backward()
    return out.total.detach()


def unfused_signal_step(inputs: dict, chunk_size: Optional[int]) -> torch.Tensor:
    logits = inputs['hidden'] @ inputs['weight'].T
    total = F.cross_entropy(logits, inputs['labels']) + signal_kl(
        logits, *inputs['signal'], temperature=TEMPERATURE, mask=inputs['mask']
    )
    total.backward()
    return total.detach()


STEPS: dict[str, Callable[[dict, Optional[int]], torch.Tensor]] = {
    'alone': alone_step,
    'signal, fused': fused_signal_step,
    'signal, unfused': unfused_signal_step,
}


def measure(args: argparse.Namespace) -> dict:
    """Each variant's median step time over ``args.rounds`` rounds (after one untimed round), and its loss."""
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, args.k)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    losses: dict[str, float] = {}
    for round_index in range(args.rounds + 1):
        for name in VARIANTS:
            inputs['hidden'].grad = inputs['weight'].grad = None
            began = time.perf_counter()
            losses[name] = float(STEPS[name](inputs, args.chunk_size))
            if round_index:
                seconds[name].append(time.perf_counter() - began)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        'shape': {'tokens': args.tokens, 'hidden': args.hidden, 'vocab': args.vocab, 'k': args.k},
        'threads': args.threads,
        'rounds': args.rounds,
        'median_seconds': medians,
        'losses': losses,
        'ratios': {
            'signal fused / alone fused': medians['signal, fused'] / medians['alone'],
            'signal unfused / alone fused': medians['signal, unfused'] / medians['alone'],
            'loss relative difference, fused vs unfused': abs(losses['signal, fused'] - losses['signal, unfused'])
            / abs(losses['signal, unfused']),
        },
    }


def markdown(report: dict) -> str:
    shape = report['shape']
    lines = [
        f'Output-layer step at {shape["tokens"]} tokens x {shape["hidden"]} hidden x {shape["vocab"]:,} vocabulary, '
        f'k = {shape["k"]}, T = {TEMPERATURE:g}, fp32, {report["threads"]} threads, median of {report["rounds"]} '
        'rounds.',
        '',
        '| variant | median step (s) |',
        '| --- | --- |',
        *(f'| {name} | {value:.4f} |' for name, value in report['median_seconds'].items()),
        '',
        '| ratio | value |',
        '| --- | --- |',
        *(f'| {name} | {value:.3g} |' for name, value in report['ratios'].items()),
    ]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tokens', type=int, default=2048)
    parser.add_argument('--hidden', type=int, default=1024)
    parser.add_argument('--vocab', type=int, default=32_000)
    parser.add_argument('--k', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds after the first')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--chunk-size', type=int, default=None, help='tokens per chunk (default: the default)')
    parser.add_argument('--quick', action='store_true', help='a tiny setting, to check the script runs')
    parser.add_argument('--output', type=Path, default=None, help='write the report as JSON (and .md beside it)')
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.k, args.rounds = 64, 16, 500, 8, 2
    report = measure(args)
    text = markdown(report)
    print(text, end='')
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2) + '\n')
        args.output.with_suffix('.md').write_text(text)
    return report


if __name__ == '__main__':
    main()
