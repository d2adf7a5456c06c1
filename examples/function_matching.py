"""Function matching on fully labelled digits: teacher and student see the same mixed images, for longer.

Beyer et al. (2022, "Knowledge distillation: A good teacher is patient and consistent") distil with the teacher
answering on exactly the strongly augmented (MixUp) image the student sees, and train far longer than usual. Here
that is the digits recipe with every training label (as ``examples/digits_full_labels.py``), Composer's ``MixUp``
in the student's ``algorithms`` and the budget raised. ``Distillation`` runs the teacher at ``Event.AFTER_LOSS`` on
the batch the student was given, which ``MixUp`` changed at ``Event.BEFORE_FORWARD``: the teacher sees the mixed
image whatever the order of the two in ``algorithms`` (``docs/function_matching.md``).

Per seed the teacher (the recipe's CNN, 40 epochs on every label, never mixed) is trained once and shared. Every
student starts from the same weights and sees the same batches, budget and optimizer (Adam lr 0.01); the student
alone gets the same ``MixUp`` and the same budget as the distilled one it is compared with, and, for reference,
the same budget without ``MixUp``. Two stages:

* ``--stage grid`` (validation split, seeds 0 to 2): :data:`GRID`, the mixing strength, the weight of the label
  term (0: distillation only; 0.5) and the budget; the setting with the best mean validation accuracy is kept
  (:func:`choose`);
* ``--stage test`` (seeds 10 to 14 and 20 to 24, never used for a choice): the chosen setting and its student alone,
  test split reported.

Each seed's numbers go to ``<output-dir>/<stage>/seed_<n>.json``, so seeds can run in separate commands; the table
is made from every seed file of the folder::

    python examples/function_matching.py --stage grid --seeds 0 --output-dir outputs/function-matching
    python examples/function_matching.py --stage test --seeds 10 11 --output-dir outputs/function-matching
    python examples/function_matching.py --stage test --table --output-dir outputs/function-matching
    python examples/function_matching.py --tiny --output-dir /tmp/fm     # seconds: what the test runs
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from composer_kd.recipes import build_run, load_recipe

#: The setting: the digits recipe with every training label, both splits evaluated once, at the end.
FULL_LABELS = ['data.digits.per_class=null', 'data.eval_splits=[val,test]', 'progress_bar=false', 'device=cpu']

#: The validation grid: MixUp's alpha, the label term's weight (distillation weight 1, KL at T=1 as in the
#: paper) and the budget in batches of 64 (14 batches are one epoch of the 897 training images).
GRID: dict[str, Sequence[Any]] = {'alpha': (0.2, 1.0), 'org_loss_weight': (0.0, 0.5), 'batches': (1000, 3000)}

#: ``--longer``: twice the grid's longest budget, for the better alpha of the grid only (added to the grid's files).
LONGER: dict[str, Sequence[Any]] = {'alpha': (1.0,), 'org_loss_weight': (0.0, 0.5), 'batches': (6000,)}

#: The distillation loss of every distilled student: KL at temperature 1, distillation weight 1.
TEMPERATURE, KD_LOSS_WEIGHT = 1.0, 1.0

#: The setting :func:`choose` kept on the validation split of seeds 0 to 2 among :data:`GRID`, and the one the test
#: seeds ran (docs/function_matching.md). With :data:`LONGER` added afterwards, ``alpha=1.0 org=0.0 6000ba`` edged
#: it on validation (96.85% against 96.76%, a third of one validation image); that was not run on the test seeds.
CHOSEN: dict[str, Any] = {'alpha': 1.0, 'org_loss_weight': 0.5, 'batches': 3000}

#: The student alone's best on the same validation runs (:func:`choose_alone`), also trained on the test seeds so
#: that the distilled student is compared with the best student alone, not only with the one of its own setting.
ALONE_CHOSEN: dict[str, Any] = {'alpha': 0.2, 'org_loss_weight': '-', 'batches': 3000}

#: A few batches per model, to test the script in seconds.
TINY: dict[str, Any] = {'alpha': 1.0, 'org_loss_weight': 0.0, 'batches': 4}
TINY_OVERRIDES = ['teachers.0.train.max_duration=1ep']


def mixup(alpha: float) -> str:
    """The recipe override that puts Composer's ``MixUp(alpha)`` in the student's algorithms."""
    return f'algorithms=[{{name: MixUp, kwargs: {{alpha: {alpha}}}}}]'


def student_overrides(seed: int, setting: Mapping[str, Any], distilled: bool, mixed: bool = True) -> list[str]:
    """The digits recipe's overrides for one student: distilled or alone, with or without ``MixUp``."""
    batches = setting['batches']
    overrides = [*FULL_LABELS, f'seed={seed}', 'baseline=false', f'max_duration={batches}ba']
    overrides += [f'eval_interval={batches}ba']
    if mixed:
        overrides.append(mixup(setting['alpha']))
    if not distilled:
        return [*overrides, 'distillation.enabled=false']
    return overrides + [
        'distillation.loss=kl',
        f'distillation.temperature={TEMPERATURE}',
        f'distillation.org_loss_weight={setting["org_loss_weight"]}',
        f'distillation.kd_loss_weight={KD_LOSS_WEIGHT}',
    ]


def _accuracy(summary: Any, role: str) -> dict[str, float]:
    model = next(m for m in summary.models if m.role.startswith(role))
    return {split: values['MulticlassAccuracy'] for split, values in model.metrics.items()}


class Seed:
    """One seed's teacher, trained on the first call and shared by every student of the seed."""

    def __init__(self, seed: int, extra: Sequence[str] = ()):
        self.seed, self.extra = seed, list(extra)
        self.teachers: Optional[list[Any]] = None
        self.teacher: Optional[dict[str, float]] = None

    def student(self, setting: Mapping[str, Any], distilled: bool, mixed: bool = True) -> dict[str, float]:
        """Train one student and return its accuracy on each split."""
        recipe = load_recipe('digits', [*student_overrides(self.seed, setting, distilled, mixed), *self.extra])
        run = build_run(recipe, teachers=self.teachers)
        with warnings.catch_warnings():
            # Composer's soft cross-entropy warns on every mixed batch whose float targets sum to 1 - 1e-7.
            warnings.filterwarnings('ignore', message='Some targets have less than 1 total probability')
            summary = run.fit()
        if self.teachers is None:
            self.teachers, self.teacher = run.teachers, _accuracy(summary, 'teacher 0')
        return _accuracy(summary, 'student')


def key(setting: Mapping[str, Any]) -> str:
    """A setting's name in reports: ``alpha=1.0 org=0.0 3000ba``."""
    return f'alpha={setting["alpha"]} org={setting["org_loss_weight"]} {setting["batches"]}ba'


def grid_settings(grid: Mapping[str, Sequence[Any]] = GRID) -> list[dict[str, Any]]:
    """Every setting of ``grid`` (default :data:`GRID`), the budget varying slowest."""
    return [
        {'alpha': a, 'org_loss_weight': w, 'batches': b}
        for b in grid['batches']
        for a in grid['alpha']
        for w in grid['org_loss_weight']
    ]


def run_seed(
    seed: int,
    settings: Sequence[Mapping[str, Any]],
    extra: Sequence[str] = (),
    echo=print,
    done: Any = None,
    alone: Sequence[Mapping[str, Any]] = (),
) -> dict:
    """Per setting, the distilled student, and per (alpha, budget) the student alone with and without MixUp.

    ``done``: this seed's earlier result, whose settings are not trained again (the new ones are added to it).
    ``alone``: further settings for which only the student alone (with MixUp) is trained.
    """
    started, state = time.perf_counter(), Seed(seed, extra)
    result: dict[str, Any] = done or {'seed': seed, 'distilled': {}, 'alone_mixup': {}, 'alone_plain': {}}
    for setting in settings:
        if key(setting) in result['distilled']:
            continue
        result['distilled'][key(setting)] = state.student(setting, distilled=True)
    for setting in [*settings, *alone]:
        alone = key({**setting, 'org_loss_weight': '-'})
        if alone not in result['alone_mixup']:
            result['alone_mixup'][alone] = state.student(setting, distilled=False)
        plain = f'{setting["batches"]}ba'
        if plain not in result['alone_plain']:
            result['alone_plain'][plain] = state.student(setting, distilled=False, mixed=False)
    result['teacher'] = state.teacher or result.get('teacher')
    result['seconds'] = result.get('seconds', 0.0) + time.perf_counter() - started
    echo(f'seed {seed}: {json.dumps({k: v for k, v in result.items() if k != "seed"})}')
    return result


def _stats(values: Sequence[float]) -> dict[str, float]:
    values = [100 * float(v) for v in values]
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0}


def common(runs: Sequence[Mapping[str, Any]], group: str) -> list[str]:
    """The settings of ``group`` every run holds (a setting added to some seeds only is left out)."""
    return [name for name in runs[0][group] if all(name in run[group] for run in runs)]


def table(runs: Sequence[Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
    """One row per distilled setting: its accuracy, its student alone's (same MixUp and budget), and the wins."""
    rows = []
    for name in common(runs, 'distilled'):
        alone = name.replace(name.split()[1], 'org=-')
        plain = name.split()[2]
        gains = [run['distilled'][name][split] - run['alone_mixup'][alone][split] for run in runs]
        rows.append(
            {
                'setting': name,
                'distilled': _stats([run['distilled'][name][split] for run in runs]),
                'alone_mixup': _stats([run['alone_mixup'][alone][split] for run in runs]),
                'alone_plain': _stats([run['alone_plain'][plain][split] for run in runs]),
                'minus_alone': _stats(gains),
                'better': sum(g > 0 for g in gains),
                'equal': sum(g == 0 for g in gains),
            }
        )
    return rows


def choose_alone(runs: Sequence[Mapping[str, Any]]) -> str:
    """The student alone's setting (with MixUp, or ``<budget>ba`` without) with the best mean validation accuracy."""
    names = [*common(runs, 'alone_mixup'), *common(runs, 'alone_plain')]

    def mean(name: str) -> float:
        group = 'alone_mixup' if name in runs[0]['alone_mixup'] else 'alone_plain'
        return statistics.fmean(run[group][name]['val'] for run in runs)

    return max(names, key=mean)


def versus(runs: Sequence[Mapping[str, Any]], split: str, distilled: str, alone: str) -> dict[str, Any]:
    """A distilled setting against one student alone (with MixUp): both accuracies, the gains, the wins."""
    gains = [run['distilled'][distilled][split] - run['alone_mixup'][alone][split] for run in runs]
    return {
        'alone': _stats([run['alone_mixup'][alone][split] for run in runs]),
        'minus_alone': _stats(gains),
        'better': sum(g > 0 for g in gains),
        'equal': sum(g == 0 for g in gains),
    }


def choose(runs: Sequence[Mapping[str, Any]]) -> str:
    """The distilled setting with the best mean validation accuracy (the first of equals)."""
    return max(table(runs, 'val'), key=lambda row: row['distilled']['mean'])['setting']


def format_table(runs: Sequence[Mapping[str, Any]], split: str) -> str:
    """The table as Markdown (mean ± sample std over the seeds, in percent)."""
    n, teacher = len(runs), _stats([run['teacher'][split] for run in runs])
    lines = [
        f'{split} split, seeds {[run["seed"] for run in runs]}; teacher {teacher["mean"]:.2f}% ± {teacher["std"]:.2f}',
        '',
        f'| setting | distilled | alone, same MixUp | alone, no MixUp | distilled - alone | better (of {n}) |',
        '| --- | ---: | ---: | ---: | ---: | ---: |',
    ]
    for row in table(runs, split):
        cells = [row['setting']]
        cells += [f'{row[c]["mean"]:.2f}% ± {row[c]["std"]:.2f}' for c in ('distilled', 'alone_mixup', 'alone_plain')]
        cells.append(f'{row["minus_alone"]["mean"]:+.2f} ± {row["minus_alone"]["std"]:.2f}')
        cells.append(f'{row["better"]}' + (f' ({row["equal"]} equal)' if row['equal'] else ''))
        lines.append('| ' + ' | '.join(cells) + ' |')
    for distilled in common(runs, 'distilled'):
        for alone in common(runs, 'alone_mixup'):
            if alone.split()[2] != distilled.split()[2] or alone.split()[0] == distilled.split()[0]:
                continue  # another budget, or in the table already
            v = versus(runs, split, distilled, alone)
            lines.append(
                f'{distilled} against the student alone with MixUp {alone}: {v["alone"]["mean"]:.2f}% ± '
                f'{v["alone"]["std"]:.2f}, distilled - alone {v["minus_alone"]["mean"]:+.2f} ± '
                f'{v["minus_alone"]["std"]:.2f}, better on {v["better"]} of {n}'
                + (f' ({v["equal"]} equal)' if v['equal'] else '')
            )
    return '\n'.join(lines)


def load_runs(folder: str) -> list[dict[str, Any]]:
    """Every seed file of ``folder``, by seed."""
    runs = []
    for path in glob.glob(os.path.join(folder, 'seed_*.json')):
        with open(path) as f:
            runs.append(json.load(f))
    return sorted(runs, key=lambda run: run['seed'])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--stage', choices=('grid', 'test'), default='test', help='validation grid or test seeds')
    parser.add_argument('--output-dir', default='outputs/function-matching', help='where the seed files go')
    parser.add_argument('--seeds', type=int, nargs='*', default=None, help='default: grid 0-2, test 10-14, 20-24')
    parser.add_argument('--table', action='store_true', help='only print the table of the seed files there')
    parser.add_argument('--longer', action='store_true', help='grid stage: add the settings of LONGER')
    parser.add_argument('--tiny', action='store_true', help='a few batches per model, one seed (seconds)')
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.tiny else ([0, 1, 2] if args.stage == 'grid' else [*range(10, 15), *range(20, 25)])
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the seeds asked for (unless ``--table``), write their files, print the stage's table and return it."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # these models gain nothing from a second thread, which only contends (docs/demo.md)
    folder = os.path.join(args.output_dir, 'tiny' if args.tiny else args.stage)
    os.makedirs(folder, exist_ok=True)
    if args.tiny:
        settings, extra = [TINY], TINY_OVERRIDES
    else:
        settings, extra = (grid_settings(LONGER if args.longer else GRID) if args.stage == 'grid' else [CHOSEN]), []
    alone = [ALONE_CHOSEN] if args.stage == 'test' and not args.tiny else []
    for seed in [] if args.table else args.seeds:
        path = os.path.join(folder, f'seed_{seed}.json')
        done = None
        if os.path.exists(path) and not args.tiny:
            with open(path) as f:
                done = json.load(f)
        run = run_seed(seed, settings, extra, done=done, alone=alone)
        with open(path, 'w') as f:
            json.dump(run, f, indent=2)
    runs = load_runs(folder)
    split = 'val' if args.stage == 'grid' else 'test'
    report = {'stage': args.stage, 'split': split, 'runs': runs, 'table': table(runs, split) if runs else []}
    if runs:
        print(format_table(runs, split))
        if args.stage == 'grid':
            report['chosen'], report['alone_chosen'] = choose(runs), choose_alone(runs)
            print(f"\nchosen on validation: {report['chosen']}; the student alone's best: {report['alone_chosen']}")
    return report


if __name__ == '__main__':
    main()
