"""Distillation when the student has every label: the demo's models and data, with ``data.digits.per_class=null``.

``composer-kd demo`` withholds labels from the student, which is where distillation helps most. Here the student
gets every one of the 897 training labels, as most users' students do, and seven students are compared over
several seeds, each from the same teacher, initial student, batches, budget (500 batches, Adam lr 0.01) and seed:

* ``alone``: the student trained on the labels only;
* ``hinton_kd``: the demo recipe's ``KLDivergence(T=4)``, label weight 0.1, distillation weight 0.9;
* ``dkd_paper``: ``DecoupledKD(T=4, alpha=1, beta=8)``, label weight 1, distillation weight 1 (the CIFAR-100
  settings of Zhao et al., 2022); ``dkd_tuned``: the same with ``beta=0.5``;
* ``standardized_kd_paper``: ``Standardized(KLDivergence(T=2))``, label weight 0.1, distillation weight 9 (the
  CIFAR-100 settings of Sun et al., 2024); ``standardized_kd_tuned``: ``T=1``, both weights 1;
* ``chosen_on_validation``: the recipe's ``search`` section with :data:`SEARCH` (a grid of losses, temperatures
  and weights, each candidate trained for 250 batches and scored on the validation split), the best then
  trained for the full 500 batches.

The ``*_tuned`` settings are the best of each loss in a validation-only exploration on other seeds (0 to 2; see
``docs/demo.md``). The teacher (the recipe's CNN, 40 epochs on every label) is trained once per seed and shared
by every student of that seed. Every model is evaluated on the validation and the test split; nothing is chosen
on the test split. It prints a table (mean ± sample standard deviation over seeds, wins over the student alone)
and writes ``report.json``::

    python examples/digits_full_labels.py --output-dir outputs/full-labels              # seeds 10 to 14
    python examples/digits_full_labels.py --output-dir outputs/full-labels --tiny       # seconds: what tests run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from composer_kd.recipes import build_run, load_recipe

#: The setting: the demo's recipe with every training label, both splits evaluated, the student alone trained too.
FULL_LABELS = ['data.digits.per_class=null', 'data.eval_splits=[val,test]', 'progress_bar=false', 'device=cpu']

#: The fixed objectives, as overrides of the recipe's ``distillation`` section. ``*_paper``: the CIFAR-100 settings
#: of each paper; ``*_tuned``: the best of each loss in a validation-only exploration on seeds 0 to 2 (docs/demo.md).
VARIANTS: dict[str, list[str]] = {
    'hinton_kd': [],  # the recipe's own: kl, T=4, org 0.1, kd 0.9
    'dkd_paper': [
        'distillation.loss=dkd',
        'distillation.loss_options={alpha: 1.0, beta: 8.0}',
        'distillation.temperature=4',
        'distillation.org_loss_weight=1.0',
        'distillation.kd_loss_weight=1.0',
    ],
    'dkd_tuned': [
        'distillation.loss=dkd',
        'distillation.loss_options={alpha: 1.0, beta: 0.5}',
        'distillation.temperature=4',
        'distillation.org_loss_weight=1.0',
        'distillation.kd_loss_weight=1.0',
    ],
    'standardized_kd_paper': [
        'distillation.loss=kl',
        'distillation.loss_options={standardize: true}',
        'distillation.temperature=2',
        'distillation.org_loss_weight=0.1',
        'distillation.kd_loss_weight=9.0',
    ],
    'standardized_kd_tuned': [
        'distillation.loss=kl',
        'distillation.loss_options={standardize: true}',
        'distillation.temperature=1',
        'distillation.org_loss_weight=1.0',
        'distillation.kd_loss_weight=1.0',
    ],
}

#: The grid of ``chosen_on_validation``: 3 losses x 3 temperatures x 2 distillation weights = 18 candidates, the
#: label weight fixed at 1, each trained for 250 batches (half the budget) and scored on the validation split.
SEARCH = (
    'search={losses: [{name: kl}, {name: dkd, options: {beta: 0.5}}, {name: kl, options: {standardize: true}}], '
    'temperatures: [1, 2, 4], kd_loss_weights: [0.5, 1.0], org_loss_weights: [1.0], max_duration: 250ba, '
    'split: val}'
)

#: Every model reported, in the table's order.
ROWS = ('teacher', 'alone', *VARIANTS, 'chosen_on_validation')

# A few steps per stage, to test the script in seconds.
TINY = [
    'max_duration=6ba',
    'eval_interval=6ba',
    'teachers.0.train.max_duration=1ep',
    'search.max_duration=3ba',
    'search.temperatures=[4]',
    'search.kd_loss_weights=[1.0]',
]


def _metric(summary: Any, role: str) -> dict[str, float]:
    model = next(m for m in summary.models if m.role == role)
    return {split: values['MulticlassAccuracy'] for split, values in model.metrics.items()}


def run_seed(seed: int, extra: Sequence[str] = (), echo=print) -> dict[str, Any]:
    """Every model of one seed: ``{model: {'val': accuracy, 'test': accuracy}}``, and the search's candidates."""
    grid = [o for o in extra if o.startswith('search.')]  # overrides of the search section, for its run only
    base = [*FULL_LABELS, *(o for o in extra if not o.startswith('search.')), f'seed={seed}']
    started = time.perf_counter()
    first = build_run(load_recipe('digits', [*base, 'baseline=true']))
    summary = first.fit()
    teachers = first.teachers
    result: dict[str, Any] = {
        'seed': seed,
        'teacher': _metric(summary, 'teacher 0'),
        'alone': _metric(summary, 'student alone'),
        'hinton_kd': _metric(summary, 'student (distilled)'),
    }
    for name, overrides in VARIANTS.items():
        if name == 'hinton_kd':
            continue
        run = build_run(load_recipe('digits', [*base, 'baseline=false', *overrides]), teachers=teachers)
        result[name] = _metric(run.fit(), 'student (distilled)')
    run = build_run(load_recipe('digits', [*base, 'baseline=false', SEARCH, *grid]), teachers=teachers)
    searched = run.fit()
    result['chosen_on_validation'] = _metric(searched, 'student (distilled)')
    report = searched.search
    result['search'] = {
        'chosen': report.best.describe(),
        'candidates': [
            {'candidate': c.describe(), 'val': s} for c, s in zip(report.candidates, report.scores, strict=True)
        ],
    }
    result['seconds'] = time.perf_counter() - started
    echo(
        f'seed {seed}: test '
        + ', '.join(f'{row} {100 * result[row]["test"]:.2f}%' for row in ROWS)
        + f'; chosen: {report.best.describe()} ({result["seconds"]:.0f} s)'
    )
    return result


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {
        'mean': statistics.fmean(values),
        'std': statistics.stdev(values) if len(values) > 1 else 0.0,
        'per_seed': values,
    }


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of each model on each split, and each distilled student's gain over the alone."""
    summary: dict[str, Any] = {}
    for row in ROWS:
        entry = {split: _stats([run[row][split] for run in runs]) for split in ('val', 'test')}
        if row not in ('teacher', 'alone'):
            gains = [run[row]['test'] - run['alone']['test'] for run in runs]
            entry['minus_alone'] = _stats(gains)
            entry['seeds_better'] = sum(g > 0 for g in gains)
            entry['seeds_equal'] = sum(g == 0 for g in gains)
        summary[row] = entry
    return summary


def format_report(report: Mapping[str, Any]) -> str:
    """The table, as Markdown, and the choices of the search."""
    n = len(report['seeds'])
    lines = [
        f'| model | test accuracy | val accuracy | test: distilled - alone | better than alone (of {n}) |',
        '| --- | ---: | ---: | ---: | ---: |',
    ]
    for row in ROWS:
        entry = report['summary'][row]
        gain = entry.get('minus_alone')
        cells = [
            row,
            f'{100 * entry["test"]["mean"]:.2f}% ± {100 * entry["test"]["std"]:.2f}',
            f'{100 * entry["val"]["mean"]:.2f}% ± {100 * entry["val"]["std"]:.2f}',
            '' if gain is None else f'{100 * gain["mean"]:+.2f} ± {100 * gain["std"]:.2f}',
            ''
            if gain is None
            else f'{entry["seeds_better"]}' + (f' ({entry["seeds_equal"]} equal)' if entry['seeds_equal'] else ''),
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
    lines.append(
        'per seed, test accuracy (%): '
        + '; '.join(
            f'seed {run["seed"]}: ' + ' / '.join(f'{100 * run[row]["test"]:.2f}' for row in ROWS)
            for run in report['runs']
        )
        + f' ({" / ".join(ROWS)})'
    )
    lines.append(
        'chosen on validation: ' + '; '.join(f'seed {run["seed"]}: {run["search"]["chosen"]}' for run in report['runs'])
    )
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output-dir', default='outputs/full-labels', help='where report.json goes')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='default: 10 to 14 (--tiny: 0)')
    parser.add_argument('--tiny', action='store_true', help='a few steps per model, one seed (seconds)')
    parser.add_argument('overrides', nargs='*', help='further key=value overrides of the digits recipe')
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.tiny else [10, 11, 12, 13, 14]
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run every seed and return the report, also written to ``<output-dir>/report.json``."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # these models gain nothing from a second thread, which only contends (docs/demo.md)
    extra = [*(TINY if args.tiny else []), *args.overrides]
    started = time.perf_counter()
    runs = [run_seed(seed, extra) for seed in args.seeds]
    report = {
        'setting': 'digits recipe with every training label (data.digits.per_class=null); test split reported',
        'seeds': list(args.seeds),
        'overrides': extra,
        'variants': VARIANTS,
        'search': SEARCH,
        'summary': summarize(runs),
        'runs': runs,
        'environment': {
            'python': platform.python_version(),
            'torch': torch.__version__,
            'platform': platform.platform(),
            'processor': platform.processor(),
            'cpu_count': os.cpu_count(),
            'threads': torch.get_num_threads(),
        },
        'wall_seconds': time.perf_counter() - started,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    print()
    print(format_report(report))
    print(f'wall time: {report["wall_seconds"]:.0f} s; report: {os.path.join(args.output_dir, "report.json")}')
    return report


if __name__ == '__main__':
    main()
