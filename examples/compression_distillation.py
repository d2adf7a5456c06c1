"""Distillation with compression on scikit-learn's digits: quantization-aware distillation to int8, and pruning
with distillation recovering accuracy. Prints two tables; ``docs/compression.md`` holds a full run's output.

Everything is the ``digits`` recipe of ``composer-kd demo`` (same splits, teacher, student and settings; see
``docs/demo.md``), changed only by recipe overrides, and every model is trained by an ordinary Composer
``Trainer``. Per seed:

1. the teacher (a CNN, every training label) and the fp32 students (alone and distilled; the student sees 10
   labels per class and 797 unlabelled images), exactly as in the demo;
2. **quantization-aware distillation**: the same distilled student, but trained with
   ``compression.qat.backend=x86`` (fake quantization from the first batch, ``torch.ao.quantization`` FX mode),
   then converted to int8; the learning rate is chosen on the validation split among ``--qat-lrs``. As a
   reference without QAT, the fp32 distilled student is also quantized after training (ranges calibrated on
   the training images);
3. **pruning**: the fp32 distilled student of step 1 is magnitude-pruned at each sparsity (``compression.pruning``,
   one-shot before the first fine-tuning batch) and fine-tuned for ``--finetune-batches`` batches on the same
   batches, once with distillation and once without (labels only); each learning rate is chosen on validation
   among ``--finetune-lrs``, separately for the two. The pruning is made permanent in the exported students.

Accuracies are the held-out test split's, mean ± sample std over seeds, at the hyperparameters with the best mean
validation accuracy. Sizes are ``torch.save(state_dict)`` bytes. Latencies are medians of many timed calls in
this one process, on one thread, fp32 and int8 in alternating blocks.

Run it with::

    python examples/compression_distillation.py                  # 5 seeds, about 25 minutes on a busy CPU
    python examples/compression_distillation.py --seeds 0 1 --sparsities 0.5 0.9
    python examples/compression_distillation.py --seeds 0 --teacher-epochs 1 --student-batches 10 \\
        --finetune-batches 5 --qat-lrs 0.01 --finetune-lrs 0.01 --sparsities 0.5 --latency-repeats 4  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from composer_kd.compression import (
    calibrate,
    convert_to_int8,
    make_pruning_permanent,
    model_size_bytes,
    prepare_qat,
    prune_model,
    sparsity,
)
from composer_kd.recipes import build_run, load_recipe
from composer_kd.run.reporting import format_table, percent

METRIC = 'MulticlassAccuracy'
SPLITS = ('val', 'test')


def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one value) of per-seed values."""
    values = [float(v) for v in values]
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0,
            'per_seed': values}  # fmt: skip


def cell(values: dict[str, Any]) -> str:
    return f'{percent(values["mean"])} ± {100 * values["std"]:.2f}'


def accuracy(model: nn.Module, dataset) -> float:
    """Accuracy of a ``ComposerClassifier`` (fp32, fake-quantized or int8) on a whole split, computed directly."""
    images, labels = dataset.tensors
    with torch.inference_mode():
        return float((model.module(images).argmax(dim=1) == labels).float().mean())


def summary_accuracy(summary, role: str) -> dict[str, float]:
    model = next(m for m in summary.models if m.role == role)
    return {split: model.metrics[split][METRIC] for split in SPLITS}


def median_latencies(
    models: dict[str, nn.Module], inputs: torch.Tensor, repeats: int, rounds: int = 5
) -> dict[str, float]:
    """Median seconds per call of each model on ``inputs``, timed in alternating blocks in this process.

    Each of ``rounds`` rounds calls every model twice to warm up, then times ``repeats // rounds`` calls in a
    row; blocks rather than strict alternation keep each model's memory reuse steady, and the rounds spread the
    machine's load over both.
    """
    timings: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, model in models.items():
                network = model.module.eval()
                network(inputs), network(inputs)
                for _ in range(max(1, repeats // rounds)):
                    start = time.perf_counter()
                    network(inputs)
                    timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in timings.items()}


def latency_by_width(widths: Sequence[int], train_images: torch.Tensor, test_images: torch.Tensor, repeats: int):
    """int8 / fp32 latency of MLP students 64-w-10 of several widths: where int8 starts to pay on this CPU."""
    from composer.models import ComposerClassifier

    rows = []
    for width in widths:
        torch.manual_seed(0)
        network = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
        fp32 = ComposerClassifier(network, num_classes=10)
        int8 = convert_to_int8(calibrate(prepare_qat(fp32, train_images[:1]), [train_images]))
        row = {'width': width, 'parameters': sum(p.numel() for p in fp32.parameters())}
        row['size_ratio'] = model_size_bytes(fp32) / model_size_bytes(int8)
        for batch in (len(test_images), 1):
            times = median_latencies({'fp32': fp32, 'int8': int8}, test_images[:batch], repeats)
            row[batch] = {**times, 'ratio': times['int8'] / times['fp32']}
        rows.append(row)
    return rows


def best_by_validation(results: dict[float, dict[str, list[float]]]) -> tuple[float, dict[str, Any]]:
    """The hyperparameter whose mean validation accuracy over seeds is highest, and its statistics."""
    chosen = max(results, key=lambda key: statistics.fmean(results[key]['val']))
    return chosen, {split: stats(results[chosen][split]) for split in SPLITS}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    parser.add_argument('--teacher-epochs', type=int, default=40, help='teacher training (the demo: 40)')
    parser.add_argument('--student-batches', type=int, default=500, help='fp32 and QAT students (the demo: 500)')
    parser.add_argument('--qat-lrs', type=float, nargs='+', default=[0.01, 0.03, 0.1])
    parser.add_argument('--sparsities', type=float, nargs='*', default=[0.5, 0.75, 0.9])
    parser.add_argument(
        '--structured-sparsities', type=float, nargs='*', default=[0.5], help='shares of hidden units removed'
    )
    parser.add_argument('--finetune-batches', type=int, default=200)
    parser.add_argument('--finetune-lrs', type=float, nargs='+', default=[0.0003, 0.001, 0.003, 0.01, 0.03, 0.1])
    parser.add_argument('--latency-repeats', type=int, default=500, help='timed calls per model and batch size')
    parser.add_argument(
        '--latency-widths',
        type=int,
        nargs='*',
        default=[32, 256, 1024],
        help='hidden widths of MLP students timed fp32 against int8 (untrained: timing only)',
    )
    parser.add_argument('--json', default=None, help='also write every measured number to this file')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    # These models are far too small to gain from intra-op threads; on a shared machine two threads only contend.
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore', category=UserWarning)
    base = [
        'progress_bar=false',
        'device=cpu',
        'data.eval_splits=[val,test]',
        f'teachers.0.train.max_duration={args.teacher_epochs}ep',
        f'max_duration={args.student_batches}ba',
        f'eval_interval={args.student_batches}ba',
    ]
    prunings = [(s, False) for s in args.sparsities] + [(s, True) for s in args.structured_sparsities]
    fp32: dict[str, dict[str, list[float]]] = {role: {s: [] for s in SPLITS} for role in ('alone', 'distilled', 'ptq')}
    qat: dict[float, dict[str, list[float]]] = {lr: {s: [] for s in SPLITS} for lr in args.qat_lrs}
    qat_fake: dict[float, dict[str, list[float]]] = {lr: {s: [] for s in SPLITS} for lr in args.qat_lrs}
    agreement: dict[float, list[float]] = {lr: [] for lr in args.qat_lrs}
    no_finetune: dict[tuple, dict[str, list[float]]] = {p: {s: [] for s in SPLITS} for p in prunings}
    finetuned: dict[tuple, dict[float, dict[str, list[float]]]] = {
        (p, distill): {lr: {s: [] for s in SPLITS} for lr in args.finetune_lrs}
        for p in prunings
        for distill in (False, True)
    }
    measured_sparsity: dict[tuple, list[float]] = {p: [] for p in prunings}
    kept: dict[str, Any] = {}
    folder = tempfile.mkdtemp(prefix='compression-')

    for seed in args.seeds:
        seed_start = time.perf_counter()
        # 1. The demo's teacher and fp32 students.
        run = build_run(load_recipe('digits', [*base, 'baseline=true', f'seed={seed}']))
        summary = run.fit()
        teachers, data, distilled = run.teachers, run.data, run.student
        for role, name in (('student alone', 'alone'), ('student (distilled)', 'distilled')):
            for split, value in summary_accuracy(summary, role).items():
                fp32[name][split].append(value)
        checkpoint = os.path.join(folder, f'distilled-{seed}.pt')
        torch.save(distilled.state_dict(), checkpoint)
        train_images = data.train.tensors[0]
        example = torch.zeros(1, *data.task.input_shape)
        # Post-training quantization of the fp32 distilled student, for reference: no training, ranges calibrated
        # on the training images.
        ptq = convert_to_int8(calibrate(prepare_qat(distilled, example), [train_images]))
        for split in SPLITS:
            fp32['ptq'][split].append(accuracy(ptq, data.splits[split]))

        # 2. Quantization-aware distillation, then int8.
        for lr in args.qat_lrs:
            overrides = [*base, 'baseline=false', f'seed={seed}', f'optimizer.lr={lr}', 'compression.qat.backend=x86']
            qat_run = build_run(load_recipe('digits', overrides), teachers=teachers)
            qat_summary = qat_run.fit()
            int8 = qat_run.exported['student (distilled)']
            for split in SPLITS:
                qat[lr][split].append(summary_accuracy(qat_summary, 'student (distilled) int8')[split])
                qat_fake[lr][split].append(summary_accuracy(qat_summary, 'student (distilled)')[split])
            test_images = data.splits['test'].tensors[0]
            with torch.inference_mode():
                same = qat_run.student.module(test_images).argmax(1) == int8.module(test_images).argmax(1)
            agreement[lr].append(float(same.float().mean()))
            if seed == args.seeds[0]:
                kept[f'int8 {lr}'] = int8
        if seed == args.seeds[0]:
            kept['fp32'], kept['ptq'] = distilled, ptq

        # 3. Pruning the distilled student, fine-tuned with and without distillation.
        for amount, structured in prunings:
            pruned = prune_model(distilled, amount, structured=structured, modules=['module.1'])
            measured_sparsity[(amount, structured)].append(sparsity(make_pruning_permanent(pruned)))
            for split in SPLITS:
                no_finetune[(amount, structured)][split].append(accuracy(pruned, data.splits[split]))
            for distill in (False, True):
                for lr in args.finetune_lrs:
                    overrides = [
                        *base,
                        'baseline=false',
                        f'seed={seed}',
                        f'student.checkpoint={checkpoint}',
                        f'max_duration={args.finetune_batches}ba',
                        f'eval_interval={args.finetune_batches}ba',
                        f'optimizer.lr={lr}',
                        f'distillation.enabled={str(distill).lower()}',
                        f'compression.pruning.amount={amount}',
                        f'compression.pruning.structured={str(structured).lower()}',
                        'compression.pruning.modules=[module.1]',
                    ]
                    pruning_run = build_run(load_recipe('digits', overrides), teachers=teachers)
                    role = 'student (distilled)' if distill else 'student alone'
                    values = summary_accuracy(pruning_run.fit(), role)
                    exported = pruning_run.exported[role]
                    assert not [k for k in exported.state_dict() if k.endswith(('_orig', '_mask'))]
                    for split in SPLITS:
                        finetuned[((amount, structured), distill)][lr][split].append(values[split])
        print(f'seed {seed} done ({time.perf_counter() - seed_start:.0f} s)', flush=True)

    # Sizes and latencies of the first seed's models, at the chosen QAT learning rate.
    qat_lr, qat_int8 = best_by_validation(qat)
    fake = {split: stats(qat_fake[qat_lr][split]) for split in SPLITS}
    int8_model = kept[f'int8 {qat_lr}']
    sizes = {'fp32': model_size_bytes(kept['fp32']), 'int8': model_size_bytes(int8_model)}
    test_images = data.splits['test'].tensors[0]
    latency = {}
    for batch in (len(test_images), 1):
        times = median_latencies({'fp32': kept['fp32'], 'int8': int8_model}, test_images[:batch], args.latency_repeats)
        latency[batch] = {**times, 'ratio': times['int8'] / times['fp32']}

    widths = latency_by_width(args.latency_widths, train_images, test_images, args.latency_repeats)
    width_table = format_table(
        ['hidden width', 'parameters', 'fp32 / int8 bytes', f'int8 / fp32 latency, {len(test_images)} images',
         'int8 / fp32 latency, 1 image'],
        [[str(r['width']), f'{r["parameters"]:,}', f'{r["size_ratio"]:.2f}', f'{r[len(test_images)]["ratio"]:.2f}',
          f'{r[1]["ratio"]:.2f}'] for r in widths],
        right=[1, 2, 3, 4],
    )  # fmt: skip

    def latency_cell(name: str, batch: int) -> str:
        return f'{1e6 * latency[batch][name]:.1f} µs'

    qat_rows = [
        ['student alone (fp32)', cell(stats(fp32['alone']['test'])), cell(stats(fp32['alone']['val'])),
         f'{sizes["fp32"]:,}', '', ''],
        ['student distilled (fp32)', cell(stats(fp32['distilled']['test'])), cell(stats(fp32['distilled']['val'])),
         f'{sizes["fp32"]:,}', latency_cell('fp32', len(test_images)), latency_cell('fp32', 1)],
        ['distilled fp32 -> int8, no QAT (calibrated)', cell(stats(fp32['ptq']['test'])),
         cell(stats(fp32['ptq']['val'])), f'{model_size_bytes(kept["ptq"]):,}', '', ''],
        [f'distilled with QAT, fake-quantized (lr {qat_lr:g})', cell(fake['test']), cell(fake['val']), '', '', ''],
        [f'distilled with QAT -> int8 (lr {qat_lr:g})', cell(qat_int8['test']), cell(qat_int8['val']),
         f'{sizes["int8"]:,}', latency_cell('int8', len(test_images)), latency_cell('int8', 1)],
    ]  # fmt: skip
    qat_table = format_table(
        ['student', 'test accuracy', 'val accuracy', 'state_dict bytes', f'latency, {len(test_images)} images',
         'latency, 1 image'],
        qat_rows,
        right=[1, 2, 3, 4, 5],
    )  # fmt: skip

    pruning_rows = [['dense (distilled fp32)', '0.0%', cell(stats(fp32['distilled']['test'])), '', '', '']]
    pruning_results = []
    for amount, structured in prunings:
        alone_lr, alone = best_by_validation(finetuned[((amount, structured), False)])
        kd_lr, kd = best_by_validation(finetuned[((amount, structured), True)])
        untuned = {split: stats(no_finetune[(amount, structured)][split]) for split in SPLITS}
        overall = statistics.fmean(measured_sparsity[(amount, structured)])
        kind = 'of hidden units' if structured else 'of hidden-layer weights'
        pruning_rows.append([
            f'{100 * amount:g}% {kind}', f'{100 * overall:.1f}%', cell(untuned['test']),
            f'{cell(alone["test"])} (lr {alone_lr:g})', f'{cell(kd["test"])} (lr {kd_lr:g})',
            f'{100 * (kd["test"]["mean"] - alone["test"]["mean"]):+.2f}',
        ])  # fmt: skip
        pruning_results.append({
            'amount': amount, 'structured': structured, 'sparsity_of_all_weights': overall,
            'no_finetuning': untuned, 'without_distillation': {'lr': alone_lr, **alone},
            'with_distillation': {'lr': kd_lr, **kd},
            'val_by_lr': {
                name: {str(lr): stats(v['val']) for lr, v in finetuned[((amount, structured), distill)].items()}
                for name, distill in (('without_distillation', False), ('with_distillation', True))
            },
        })  # fmt: skip
    pruning_table = format_table(
        ['pruned (first layer)', 'all weights zero', 'no fine-tuning', 'fine-tuned, labels only',
         'fine-tuned, distilled', 'distilled - labels'],
        pruning_rows,
        right=[1, 2, 3, 4, 5],
    )  # fmt: skip

    n = len(args.seeds)
    seeds = f'{n} seed{"s" if n > 1 else ""}'
    print()
    print(f'Quantization-aware distillation (x86 engine), digits test split, mean ± std over {seeds} {args.seeds}')
    print(qat_table)
    print(
        f'int8 is {sizes["fp32"] / sizes["int8"]:.2f}x smaller on disk; int8 / fp32 latency (median of '
        f'{args.latency_repeats} calls each, 1 thread): {latency[len(test_images)]["ratio"]:.2f} on '
        f'{len(test_images)} images, {latency[1]["ratio"]:.2f} on 1 image'
    )
    by_lr = ', '.join(f'{lr:g}: {percent(statistics.fmean(qat[lr]["val"]))}' for lr in args.qat_lrs)
    print(f'QAT learning rate chosen on validation (mean val accuracy of the int8 student by lr: {by_lr})')
    print(
        f'int8 vs fake-quantized argmax agreement on the test images: '
        f'{percent(statistics.fmean(agreement[qat_lr]))} (mean over seeds)'
    )
    if widths:
        print()
        print('int8 against fp32 by student width (MLP 64-w-10, untrained, calibrated on the training images)')
        print(width_table)
    print()
    print(
        f'Pruning with distillation: fp32 distilled student pruned once, fine-tuned {args.finetune_batches} '
        f'batches; digits test split, mean ± std over {seeds}'
    )
    print(pruning_table)
    wall = time.perf_counter() - start
    print(f'wall time: {wall:.0f} s')

    results = {
        'seeds': list(args.seeds),
        'arguments': vars(args),
        'fp32': {name: {split: stats(v[split]) for split in SPLITS} for name, v in fp32.items()},
        'qat': {'lr': qat_lr, 'int8': qat_int8, 'fake_quantized': fake,
                'int8_vs_fake_agreement': stats(agreement[qat_lr]),
                'val_by_lr': {str(lr): stats(qat[lr]['val']) for lr in args.qat_lrs}},
        'size_bytes': sizes,
        'latency_seconds': {str(batch): values for batch, values in latency.items()},
        'latency_by_width': [{str(k): v for k, v in row.items()} for row in widths],
        'pruning': pruning_results,
        'tables': {'qat': qat_table, 'width': width_table, 'pruning': pruning_table},
        'wall_seconds': wall,
    }  # fmt: skip
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == '__main__':
    main()
