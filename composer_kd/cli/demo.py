"""``composer-kd demo``: does distillation help, measured on real data that ships with scikit-learn.

The demo runs the built-in ``digits`` recipe once per seed: a CNN teacher is trained on every training label,
then a 2,410-parameter MLP student is trained on 10 labels per class, once alone and once distilled from the
teacher, with identical data, batches, budget, initialization and seed. Each model is evaluated on a held-out
test split that played no part in any choice (hyperparameters were chosen on the validation split: see
``docs/demo.md``, and :func:`run_sweep` to repeat the search). It prints a table, and writes a JSON report and
a PNG of the accuracy curves into an output folder.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from omegaconf import OmegaConf

from composer_kd.losses import IGNORE_INDEX
from composer_kd.models.speed import measure_speedup
from composer_kd.recipes.build import build_run
from composer_kd.recipes.loader import load_recipe
from composer_kd.recipes.run import describe_model
from composer_kd.run.reporting import RunSummary, distillation_ratio, format_table, percent

__all__ = ['DEFAULT_SEEDS', 'ROLES', 'format_report', 'format_sweep', 'measure_speedup', 'run_demo', 'run_sweep']

#: Seeds of the reported runs.
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
#: The three models compared, by their role in a recipe run, and their names in the report.
ROLES = {'teacher 0': 'teacher', 'student alone': 'student_alone', 'student (distilled)': 'student_distilled'}
_LABELS = {'teacher': 'teacher', 'student_alone': 'student alone', 'student_distilled': 'student (distilled)'}
_METRIC = 'MulticlassAccuracy'

Printer = Callable[[str], None]


def _single_thread() -> None:
    """Run torch on one thread: these models are too small to gain from intra-op parallelism, and on a machine
    whose cores are busy with other work two threads made a teacher's training 27x slower (measured: 49.4 s
    against 1.8 s for 5 epochs), as each waits for the other to be scheduled."""
    torch.set_num_threads(1)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min, max, and the values themselves."""
    values = [float(v) for v in values]
    return {
        'mean': statistics.fmean(values),
        'std': statistics.stdev(values) if len(values) > 1 else 0.0,
        'min': min(values),
        'max': max(values),
        'per_seed': values,
    }


class _Curves:
    """One ``InMemoryLogger`` per model of a run, for accuracy-over-training curves."""

    def __init__(self) -> None:
        self.loggers: dict[str, InMemoryLogger] = {}

    def __call__(self, role: str) -> list[InMemoryLogger]:
        self.loggers[role] = InMemoryLogger()
        return [self.loggers[role]]

    def curve(self, role: str, split: str) -> list[tuple[int, float]]:
        logger = self.loggers.get(role)
        if logger is None:
            return []
        series = logger.data.get(f'metrics/{split}/{_METRIC}', [])
        return [(int(timestamp.batch), float(value)) for timestamp, value in series]


def _recipe_overrides(seed: int, overrides: Sequence[str]) -> list[str]:
    # The demo evaluates both splits (validation to show what was tuned on, test to report) and never shows
    # Composer's per-run progress bars: it prints one line per seed instead. It is a CPU demo, measured on CPUs:
    # `device=gpu` among the overrides moves it.
    fixed = ['data.eval_splits=[val,test]', 'progress_bar=false', 'baseline=true', 'device=cpu']
    return [*fixed, *overrides, f'seed={seed}']


def _labelled_images(trainer: Optional[Trainer]) -> Optional[int]:
    """How many labelled examples a trainer's training data holds (``None`` for a teacher not trained here)."""
    if trainer is None:
        return None
    labels = trainer.state.train_dataloader.dataset.tensors[1]  # type: ignore[union-attr]
    return int((labels != IGNORE_INDEX).sum())


def _summary_value(summary: RunSummary, role: str, split: str) -> float:
    for model in summary.models:
        if model.role == role:
            return model.metrics[split][_METRIC]
    raise KeyError(role)


def _plot(curves: dict[str, list[list[tuple[int, float]]]], finals: dict[str, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use('Agg')  # no display needed, and none is assumed
    import matplotlib.pyplot as plt

    colors = {'teacher': 'tab:gray', 'student_alone': 'tab:blue', 'student_distilled': 'tab:orange'}
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        length = min(len(r) for r in runs)
        steps = [b for b, _ in runs[0][:length]]
        values = [[v for _, v in r[:length]] for r in runs]
        mean = [statistics.fmean(column) for column in zip(*values, strict=True)]
        low = [min(column) for column in zip(*values, strict=True)]
        high = [max(column) for column in zip(*values, strict=True)]
        final = finals[name]
        label = f'{_LABELS[name]}: {percent(final["mean"])} ± {100 * final["std"]:.2f}'
        ax.plot(steps, [100 * v for v in mean], marker='o', markersize=3, color=colors[name], label=label)
        if len(runs) > 1:
            ax.fill_between(steps, [100 * v for v in low], [100 * v for v in high], color=colors[name], alpha=0.2)
    ax.set_xlabel('training batches')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(
    output_dir: Optional[str] = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    overrides: Sequence[str] = (),
    speed_repeats: int = 30,
    echo: Printer = print,
) -> dict[str, Any]:
    """Run the demo: per seed, train the teacher, the student alone and the distilled student; report.

    Args:
        output_dir (str, optional): Where ``report.json`` and ``accuracy.png`` go. Default:
            ``./outputs/demo-<date>-<time>``.
        seeds (Sequence[int], optional): One run of the three models per seed. Default: :data:`DEFAULT_SEEDS`.
        overrides (Sequence[str], optional): ``key=value`` overrides of the ``digits`` recipe (e.g. a shorter
            ``max_duration`` for a quick look).
        speed_repeats (int, optional): Timings per model for the inference speed-up. Default: ``30``.
        echo (Callable[[str], None], optional): Where progress lines and the table go. Default: ``print``.

    Returns:
        dict: The report, as written to ``report.json``.
    """
    start = time.perf_counter()
    if not seeds:
        raise ValueError('The demo needs at least one seed.')
    output_dir = output_dir or os.path.join('outputs', datetime.now().strftime('demo-%Y%m%d-%H%M%S'))
    os.makedirs(output_dir, exist_ok=True)
    _single_thread()

    results = _SeedResults()
    for seed in seeds:
        _run_seed(results, seed, overrides, speed_repeats, echo)
    report = _demo_report(results, seeds, overrides, speed_repeats)
    report_path = os.path.join(output_dir, 'report.json')
    plot_path = os.path.join(output_dir, 'accuracy.png')
    title = (
        f'digits: {report["dataset"]["labelled_train_images"]} labels for the student, test accuracy over training '
        f'(mean of {len(seeds)} seed{"s" if len(seeds) > 1 else ""}, band = min-max)'
    )
    finals = {name: model['test_accuracy'] for name, model in report['models'].items()}
    _plot(results.curves, finals, plot_path, title)
    report['wall_seconds'] = time.perf_counter() - start
    report['files'] = {'report': report_path, 'plot': plot_path}
    with open(report_path, 'w') as f:
        json.dump(report, f, indent=2)
    echo('')
    echo(format_report(report))
    return report


@dataclass
class _SeedResults:
    """What the demo's runs gave, seed after seed, by model name (:data:`ROLES`); the last run's recipe, data and
    models describe them all."""

    accuracy: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {name: {'val': [], 'test': []} for name in ROLES.values()}
    )
    seconds: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in ROLES.values()})
    curves: dict[str, list[list[tuple[int, float]]]] = field(
        default_factory=lambda: {name: [] for name in ROLES.values()}
    )
    ratios: list[Optional[float]] = field(default_factory=list)
    speeds: list[dict[str, float]] = field(default_factory=list)
    recipe: Any = None
    run: Any = None


def _run_seed(results: _SeedResults, seed: int, overrides: Sequence[str], speed_repeats: int, echo: Printer) -> None:
    """Train the teacher, the student alone and the distilled student with ``seed``; add what they gave."""
    recipe = load_recipe('digits', _recipe_overrides(seed, overrides))
    recorder = _Curves()
    run = build_run(recipe, source='digits', loggers=recorder)
    summary = run.fit()
    for role, name in ROLES.items():
        for split in ('val', 'test'):
            results.accuracy[name][split].append(_summary_value(summary, role, split))
        results.seconds[name].append(next(m.train_seconds for m in summary.models if m.role == role) or 0.0)
        results.curves[name].append(recorder.curve(role, 'test'))
    test = {name: results.accuracy[name]['test'][-1] for name in ROLES.values()}
    results.ratios.append(distillation_ratio(test['teacher'], test['student_alone'], test['student_distilled']))
    test_images = run.data.splits['test'].tensors[0]  # type: ignore[attr-defined]
    results.speeds.append(measure_speedup(run.teachers[0], run.student, test_images, repeats=speed_repeats))
    results.recipe, results.run = recipe, run
    echo(
        f'seed {seed}: test accuracy teacher {percent(test["teacher"])}, student alone '
        f'{percent(test["student_alone"])}, distilled {percent(test["student_distilled"])} '
        f'({summary.wall_seconds:.1f} s)'
    )


def _demo_report(
    results: _SeedResults, seeds: Sequence[int], overrides: Sequence[str], speed_repeats: int
) -> dict[str, Any]:
    """The report of :func:`run_demo`, less its wall time and files."""
    recipe, run = results.recipe, results.run
    assert recipe is not None and run is not None
    accuracy = results.accuracy
    finals = {name: _stats(accuracy[name]['test']) for name in ROLES.values()}
    means = {name: finals[name]['mean'] for name in ROLES.values()}
    gains = [
        d - a for d, a in zip(accuracy['student_distilled']['test'], accuracy['student_alone']['test'], strict=True)
    ]
    return {
        'dataset': _dataset_facts(run),
        'seeds': list(seeds),
        'metric': 'accuracy on the held-out test split (fraction); val: on the validation split',
        'models': {
            name: {
                'architecture': describe_model(recipe.teachers[0] if name == 'teacher' else recipe.student),
                'parameters': sum(
                    p.numel() for p in (run.teachers[0] if name == 'teacher' else run.student).parameters()
                ),
                'test_accuracy': finals[name],
                'val_accuracy': _stats(accuracy[name]['val']),
                'train_seconds': _stats(results.seconds[name]),
            }
            for name in ROLES.values()
        },
        'distillation_ratio': {
            'definition': '(distilled - alone) / (teacher - alone), test accuracy',
            'of_means': distillation_ratio(means['teacher'], means['student_alone'], means['student_distilled']),
            **_stats([r for r in results.ratios if r is not None] or [float('nan')]),
        },
        'distilled_minus_alone': {**_stats(gains), 'seeds_better': sum(g > 0 for g in gains)},
        'distilled_beats_alone': means['student_distilled'] > means['student_alone'],
        'inference': _inference_facts(results.speeds, len(run.data.splits['test']), speed_repeats),
        'recipe': OmegaConf.to_container(OmegaConf.structured(recipe)),
        'overrides': list(overrides),
        'environment': {
            'python': platform.python_version(),
            'torch': torch.__version__,
            'platform': platform.platform(),
            'cpu_count': os.cpu_count(),
        },
        'curves': {name: results.curves[name] for name in ROLES.values()},
    }


def _dataset_facts(run: Any) -> dict[str, Any]:
    """The digits data of a run: how many images each split holds, and how many of them are labelled."""
    data = run.data
    return {
        'name': 'scikit-learn digits (sklearn.datasets.load_digits, bundled, 8x8 images, 10 classes)',
        'train_images': len(data.train),
        'labelled_train_images': data.notes.get('labelled'),
        'unlabelled_train_images': data.notes.get('unlabelled'),
        'val_images': len(data.splits['val']),
        'test_images': len(data.splits['test']),
        'teacher_labelled_train_images': _labelled_images(run.teacher_trainers[0]),
    }


def _inference_facts(speeds: Sequence[dict[str, float]], batch_size: int, repeats: int) -> dict[str, Any]:
    """The medians over seeds of the inference timings, and how they were taken."""
    return {
        'batch_size': batch_size,
        'threads': torch.get_num_threads(),
        'repeats': repeats,
        'teacher_us_per_example': statistics.median(s['teacher_us_per_example'] for s in speeds),
        'student_us_per_example': statistics.median(s['student_us_per_example'] for s in speeds),
        'speedup': statistics.median(s['speedup'] for s in speeds),
        'speedup_per_seed': [s['speedup'] for s in speeds],
    }


def format_report(report: dict[str, Any]) -> str:
    """The demo's table and the lines under it, from a report as :func:`run_demo` returns it."""
    models, n_seeds = report['models'], len(report['seeds'])
    d = report['dataset']

    def spread(stats: dict[str, Any]) -> str:
        return f'{percent(stats["mean"])} ± {100 * stats["std"]:.2f}'

    rows = [
        [
            _LABELS[name],
            m['architecture'],
            f'{m["parameters"]:,}',
            spread(m['test_accuracy']),
            spread(m['val_accuracy']),
            f'{m["train_seconds"]["mean"]:.1f} s',
        ]
        for name, m in models.items()
    ]
    table = format_table(
        ['model', 'architecture', 'parameters', 'test accuracy', 'val accuracy', 'train time'], rows, right=[2, 3, 4, 5]
    )
    ratio, gain, speed = report['distillation_ratio'], report['distilled_minus_alone'], report['inference']
    threads = f'{speed["threads"]} thread' + ('s' if speed['threads'] > 1 else '')
    of_means = ratio['of_means']
    lines = [
        f'Knowledge distillation on scikit-learn digits: mean ± std over {n_seeds} seed{"s" if n_seeds > 1 else ""} '
        f'{report["seeds"]}',
        f'data: {d["train_images"]} training images, of which the students see {d["labelled_train_images"]} labelled '
        f'and {d["unlabelled_train_images"]} unlabelled (the teacher learnt from {d["teacher_labelled_train_images"]} '
        'labels); '
        f'{d["val_images"]} validation, {d["test_images"]} test images held out',
        '',
        table,
        '',
        f'distilled - alone: {100 * gain["mean"]:+.2f} points (better on {gain["seeds_better"]} of {n_seeds} seeds)',
        'distillation ratio (distilled - alone) / (teacher - alone): '
        + (f'{of_means:.2f} on the means' if of_means is not None else 'undefined (teacher not better)')
        + (f', {ratio["mean"]:.2f} ± {ratio["std"]:.2f} per seed' if n_seeds > 1 else ''),
        f'student inference speed-up over the teacher: {speed["speedup"]:.1f}x '
        f'({speed["teacher_us_per_example"]:.2f} vs {speed["student_us_per_example"]:.2f} µs per image; batches of '
        f'{speed["batch_size"]}, {threads}, median of {speed["repeats"]} timings each)',
        f'parameters: the student has {models["teacher"]["parameters"] / models["student_alone"]["parameters"]:.0f}x '
        'fewer than the teacher',
        f'wall time: {report["wall_seconds"]:.1f} s',
        f'report: {report["files"]["report"]}',
        f'plot: {report["files"]["plot"]}',
    ]
    return '\n'.join(lines)


#: The validation search behind the digits recipe's settings (see docs/demo.md).
SWEEP_LEARNING_RATES = (0.003, 0.01, 0.03)
SWEEP_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
SWEEP_KD_WEIGHTS = (0.5, 0.9, 1.0)


def run_sweep(
    output_dir: Optional[str] = None,
    seeds: Sequence[int] = (0, 1, 2),
    overrides: Sequence[str] = (),
    echo: Printer = print,
) -> dict[str, Any]:
    """Repeat the search that chose the ``digits`` recipe's settings, on the validation split only.

    First the student alone's learning rate (each of :data:`SWEEP_LEARNING_RATES`); the best on validation is
    the baseline's, and the distilled student reuses it. Then the distilled student's temperature and
    distillation weight (:data:`SWEEP_TEMPERATURES` x :data:`SWEEP_KD_WEIGHTS`, with ``org_loss_weight = 1 - w``).
    One teacher is trained per seed and shared by every configuration of that seed. The test split is never
    looked at.

    Returns:
        dict: ``{'student_alone': [...], 'distilled': [...], 'chosen': {...}}``, also written to ``sweep.json``.
    """
    output_dir = output_dir or os.path.join('outputs', datetime.now().strftime('sweep-%Y%m%d-%H%M%S'))
    os.makedirs(output_dir, exist_ok=True)
    _single_thread()
    base = ['progress_bar=false', 'baseline=false', 'data.eval_splits=[val]', 'device=cpu', *overrides]
    teachers: dict[int, list] = {}
    teacher_val: list[float] = []

    def val_accuracy(extra: Sequence[str], seed: int) -> float:
        recipe = load_recipe('digits', [*base, *extra, f'seed={seed}'])
        run = build_run(recipe, source='digits', teachers=teachers.get(seed))
        summary = run.fit()
        if seed not in teachers:
            teachers[seed] = run.teachers
            teacher_val.append(summary.value('teacher 0') or 0.0)
        return summary.value(summary.models[-1].role) or 0.0

    results: dict[str, Any] = {'seeds': list(seeds), 'student_alone': [], 'distilled': []}
    for lr in SWEEP_LEARNING_RATES:
        scores = [val_accuracy([f'optimizer.lr={lr}', 'distillation.enabled=false'], s) for s in seeds]
        results['student_alone'].append({'lr': lr, 'val_accuracy': _stats(scores)})
        echo(f'student alone, lr {lr}: val {percent(statistics.fmean(scores))}')
    best_lr = max(results['student_alone'], key=lambda r: r['val_accuracy']['mean'])['lr']
    results['distilled'] = _sweep_distilled(val_accuracy, seeds, best_lr, echo)
    best = max(results['distilled'], key=lambda r: r['val_accuracy']['mean'])
    results['teacher_val_accuracy'] = _stats(teacher_val)
    results['chosen'] = {'lr': best_lr, 'temperature': best['temperature'], 'kd_loss_weight': best['kd_loss_weight']}
    with open(os.path.join(output_dir, 'sweep.json'), 'w') as f:
        json.dump(results, f, indent=2)
    echo('')
    echo(format_sweep(results))
    return results


def _sweep_distilled(
    val_accuracy: Callable[[Sequence[str], int], float], seeds: Sequence[int], lr: float, echo: Printer
) -> list[dict[str, Any]]:
    """The distilled student's validation accuracy at ``lr`` for each temperature and distillation weight ``w``
    (:data:`SWEEP_TEMPERATURES` x :data:`SWEEP_KD_WEIGHTS`, with ``org_loss_weight = 1 - w``)."""
    rows = []
    for temperature in SWEEP_TEMPERATURES:
        for weight in SWEEP_KD_WEIGHTS:
            extra = [
                f'optimizer.lr={lr}',
                f'distillation.temperature={temperature}',
                f'distillation.kd_loss_weight={weight}',
                f'distillation.org_loss_weight={round(1 - weight, 6)}',
            ]
            scores = [val_accuracy(extra, s) for s in seeds]
            rows.append({'temperature': temperature, 'kd_loss_weight': weight, 'val_accuracy': _stats(scores)})
            echo(f'distilled, T {temperature:g}, kd weight {weight:g}: val {percent(statistics.fmean(scores))}')
    return rows


def format_sweep(results: dict[str, Any]) -> str:
    """The validation search as two tables (markdown-compatible rows)."""

    def cell(stats: dict[str, Any]) -> str:
        return f'{percent(stats["mean"])} ± {100 * stats["std"]:.2f}'

    alone = format_table(
        ['student alone: lr', 'val accuracy'],
        [[f'{r["lr"]:g}', cell(r['val_accuracy'])] for r in results['student_alone']],
    )
    distilled = format_table(
        ['T', 'kd weight', 'val accuracy'],
        [[f'{r["temperature"]:g}', f'{r["kd_loss_weight"]:g}', cell(r['val_accuracy'])] for r in results['distilled']],
    )
    chosen = results['chosen']
    return '\n'.join(
        [
            f'teacher val accuracy: {cell(results["teacher_val_accuracy"])} (seeds {results["seeds"]})',
            alone,
            '',
            distilled,
            '',
            f'chosen: lr {chosen["lr"]:g}, T {chosen["temperature"]:g}, kd weight {chosen["kd_loss_weight"]:g}',
        ]
    )
