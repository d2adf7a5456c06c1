"""Run the benchmark suite and write ``results.json`` and ``results.md``.

    python -m benchmarks.run                 # the full suite (a few minutes on 2 CPU cores)
    python -m benchmarks.run --quick         # tiny models and shapes: checks the suite works, measures nothing
    python -m benchmarks.run --only cache    # only the teacher cache's figures (results-cache.{json,md})

Step times (benchmarks/overhead.py), the operators and host synchronizations of a step (benchmarks/host_work.py),
peak memory of whole runs (benchmarks/memory.py) and the token-level KL's memory and time
(benchmarks/kl_memory.py). Every time figure is a ratio of medians measured in the same run. On
CPU, each step-time measurement runs twice, in fresh processes: with glibc's default allocator settings, and
with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` raised, which stops glibc from handing large
activation buffers back to the operating system after every step (and faulting them in again on the next).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ALLOCATOR_SETTINGS = {
    'glibc default': {},
    'glibc thresholds raised': {'MALLOC_MMAP_THRESHOLD_': '4294967296', 'MALLOC_TRIM_THRESHOLD_': '4294967296'},
}


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    if args.worker == 'overhead':
        from benchmarks.overhead import measure
        from benchmarks.pairs import dispatch_pair

        # Many short rounds: drift in the machine's speed then reaches every variant alike.
        counts = {'warmup': 1, 'steps': 2, 'rounds': 2} if args.quick else {'warmup': 3, 'steps': 5, 'rounds': 10}
        # Millisecond steps: many more of them, for medians as steady as the large pairs' 30.
        dispatch_counts = counts if args.quick else {'warmup': 20, 'steps': 60, 'rounds': 10}
        cache_only = args.only == 'cache'
        runs = [(pair, counts) for pair in _model_pairs(args.quick)] + [(dispatch_pair(), dispatch_counts)]
        result: Any = [
            measure(pair, args.device, compile_teacher=not args.quick, cache_only=cache_only, **pair_counts)
            for pair, pair_counts in runs
        ]
    elif args.worker == 'host_work':
        from benchmarks.host_work import measure
        from benchmarks.pairs import dispatch_pair

        result = [measure(pair) for pair in [*_model_pairs(args.quick), dispatch_pair()]]
    elif args.worker.startswith('memory_'):
        from benchmarks.memory import measure
        from benchmarks.pairs import text_pair, vision_pair

        pair_name, variant = args.worker.removeprefix('memory_').split(':')
        build = {'vision': vision_pair, 'text': lambda tiny: text_pair(tiny=tiny, seq=16 if tiny else 128)}[pair_name]
        result = measure(build(tiny=args.quick), variant, args.device, steps=1 if args.quick else 3)
    else:
        from benchmarks.kl_memory import run

        shape = (2, 16, 500) if args.quick else (4, 512, 32000)
        result = run(args.worker.removeprefix('kl_'), *shape, device=args.device)
    print(json.dumps(result))


def _model_pairs(quick: bool) -> list:
    from benchmarks.pairs import text_pair, vision_pair

    return [vision_pair(tiny=quick), text_pair(tiny=quick, seq=16 if quick else 128)]


def _spawn(worker: str, device: str, quick: bool, extra_env: dict[str, str], only: str = 'all') -> Any:
    command = [sys.executable, '-m', 'benchmarks.run', '--worker', worker, '--device', device, '--only', only]
    if quick:
        command.append('--quick')
    env = {
        **os.environ,
        **extra_env,
        'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
    }
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f'benchmark worker {worker} failed:\n{done.stderr[-4000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine(device: str) -> str:
    """The processor (and the CPU features that decide whether bf16 can be fast on it), or the GPU."""
    import torch

    if device == 'cuda':
        return torch.cuda.get_device_name()
    model, flags = platform.processor() or 'unknown CPU', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'model name':
                    model = value.strip()
                elif key.strip() == 'flags':
                    flags = set(value.split())
                    break
    except OSError:
        pass
    features = [flag for flag in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if flag in flags]
    return f'{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads' + (
        f' ({", ".join(features)})' if features else ''
    )


def _markdown(report: dict[str, Any]) -> str:
    lines = [f'# Benchmark results ({report["device"]}{", quick" if report["quick"] else ""})', '']
    if 'machine' in report:  # reports written before the machine was recorded lack it
        lines += [f'Machine: {report["machine"]}.', '']
    lines += ['## Step time ratios (medians)', '']
    for setting, pairs in report['overhead'].items():
        for pair in pairs:
            reps = pair['repeats']
            lines.append(
                f'### {pair["pair"]}: {pair["description"]} ({setting}; {reps["rounds"]} rounds x '
                f'{reps["steps_per_round"]} steps after {reps["warmup"]} warm-up)'
            )
            lines += ['', '| figure | value |', '| --- | --- |']
            lines += [f'| {name} | {value:.3f} |' for name, value in pair['ratios'].items()]
            medians = ', '.join(f'{k} {v * 1000:.3g} ms' for k, v in pair['median_seconds'].items())
            lines += ['', f'Medians: {medians}.']
            lines += [
                f'Teacher forward passes during the timed cached steps: {pair["cached_teacher_calls_timed"]}.',
                '',
            ]
    if 'host_work' in report:
        lines += ['## Work per step on the host', '']
        lines += [
            'Operators dispatched and host synchronizations in one whole training step, counted (not timed); '
            'the same on any machine for the same code.',
            '',
        ]
        for pair in report['host_work']:
            lines += [f'### {pair["pair"]}: {pair["description"]}', '', '| figure | count |', '| --- | --- |']
            lines += [f'| {name} | {value} |' for name, value in pair['figures'].items()]
            per_variant = ', '.join(f'{k} {v}' for k, v in pair['operators'].items())
            lines += ['', f'Operators per step: {per_variant}.', '']
    if 'memory' in report:
        lines += ['## Peak memory of a run', '']
        lines += [
            'Each variant in its own process; peaks measured above the memory held when it started, with the '
            "teacher's weights already in place in every variant.",
            '',
        ]
        for pair_name, figures in report['memory'].items():
            lines += [f'### {pair_name}', '', '| figure | value |', '| --- | --- |']
            lines += [f'| {name} | {value:.3f} |' for name, value in figures.items()]
            lines.append('')
    if 'kl_memory' not in report:
        return '\n'.join(lines)
    kl = report['kl_memory']
    naive, chunked = kl['naive'], kl['chunked']
    lines += ['## Token-level KL, forward + backward', '']
    lines += [f'Logits {naive["shape"]}; {naive["repeats"]} repeats each, in separate processes.', '']
    lines += ['| figure | value |', '| --- | --- |']
    lines += [
        f'| extra peak memory, chunked / naive | {kl["memory_ratio"]:.3f} |',
        f'| extra peak memory, naive | {naive["extra_peak_bytes"] / 2**20:.0f} MiB |',
        f'| extra peak memory, chunked | {chunked["extra_peak_bytes"] / 2**20:.0f} MiB |',
        f'| time, chunked / naive | {kl["time_ratio"]:.3f} |',
        f'| relative difference of the values | {kl["value_relative_difference"]:.2e} |',
        f'| relative difference of the gradient norms | {kl["grad_norm_relative_difference"]:.2e} |',
        '',
    ]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='tiny models and shapes (for tests)')
    parser.add_argument('--device', choices=['cpu', 'cuda', 'auto'], default='auto')
    parser.add_argument('--output-dir', default=str(ROOT / 'benchmarks' / 'results'))
    parser.add_argument('--only', choices=['all', 'cache'], default='all', help='run only part of the suite')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == 'auto':
        import torch

        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.worker:
        _worker(args)
        return {}

    settings = ALLOCATOR_SETTINGS if args.device == 'cpu' else {'CUDA caching allocator': {}}
    report: dict[str, Any] = {
        'device': args.device,
        'machine': _machine(args.device),
        'quick': args.quick,
        'only': args.only,
        'overhead': {},
    }
    for setting, env in settings.items():
        print(f'timing steps ({setting}) ...', flush=True)
        report['overhead'][setting] = _spawn('overhead', args.device, args.quick, env, args.only)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if args.only == 'cache':
        (output / 'results-cache.json').write_text(json.dumps(report, indent=2))
        (output / 'results-cache.md').write_text(_markdown(report))
        print(_markdown(report))
        print(f'written: {output / "results-cache.json"}, {output / "results-cache.md"}')
        return report
    print('counting the operators of a step ...', flush=True)
    report['host_work'] = _spawn('host_work', args.device, args.quick, {})
    print('measuring peak memory of runs ...', flush=True)
    from benchmarks.memory import VARIANTS, ratios

    report['memory'] = {
        pair_name: ratios({v: _spawn(f'memory_{pair_name}:{v}', args.device, args.quick, {}) for v in VARIANTS})
        for pair_name in ('vision', 'text')
    }
    print('measuring the token-level KL loss ...', flush=True)
    naive, chunked = (_spawn(f'kl_{v}', args.device, args.quick, {}) for v in ('naive', 'chunked'))
    report['kl_memory'] = {
        'naive': naive,
        'chunked': chunked,
        'memory_ratio': chunked['extra_peak_bytes'] / max(naive['extra_peak_bytes'], 1),
        'time_ratio': chunked['median_seconds'] / naive['median_seconds'],
        'value_relative_difference': abs(chunked['value'] - naive['value']) / abs(naive['value']),
        'grad_norm_relative_difference': abs(chunked['grad_norm'] - naive['grad_norm']) / naive['grad_norm'],
    }
    (output / 'results.json').write_text(json.dumps(report, indent=2))
    (output / 'results.md').write_text(_markdown(report))
    print(_markdown(report))
    print(f'written: {output / "results.json"}, {output / "results.md"}')
    return report


if __name__ == '__main__':
    main()
