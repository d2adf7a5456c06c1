"""Multi-task distillation on scikit-learn's bundled digits: one teacher per task, a student with two heads.

Every 8x8 digit image carries two real labels: its class (task ``digit``, 10-way) and its parity (task
``parity``, odd or even). The student is a small MLP whose shared hidden layer feeds one linear head per task
(:class:`composer_kd.MultiTaskClassifier`). Each task has its own teacher, trained first on every training label
of that task alone: a CNN for the class, an MLP for the parity. The student sees the labels of 10 images per class;
the other ~800 training images stay in its batches without labels (16 labelled and 48 unlabelled per batch), so
only a teacher can say anything about them.

The distilled student's trainer holds two ``Distillation`` instances, one per task, each with its own teacher,
head (``student_logits_key``), temperature and weight, and its own loss term ``kd/<task>``::

    total = org_loss_weight * (ce/digit + ce/parity) + w_digit * kd/digit + w_parity * kd/parity

The student alone is the same model from the same initialization, trained on the same batches with the same
budget and seed, without the two ``Distillation`` s.

Settings are chosen on the validation split only (``--sweep``: learning rate of the student alone, then the
two temperatures and the distillation weight), and the test split is reported over several seeds, mean ± std.
The defaults are the settings the sweep chose (see ``docs/multitask.md``)::

    python examples/multitask_distillation.py                 # 5 seeds, several minutes on one CPU core
    python examples/multitask_distillation.py --sweep         # the validation search first, then the report
    python examples/multitask_distillation.py --seeds 1 --teacher-epochs 1 --student-batches 4   # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.utils import reproducibility
from torch import nn
from torch.utils.data import DataLoader

from composer_kd import Distillation, KLDivergence, MultiTaskClassifier
from composer_kd.recipes.data import MixedBatchSampler, MultiTaskDataset, digits_multitask, load_digits_splits
from composer_kd.run.reporting import distillation_ratio, format_table

TASKS = {'digit': 10, 'parity': 2}
# The settings the validation sweep chose (docs/multitask.md); --sweep repeats the search.
DEFAULTS = {'lr': 0.03, 'temperature_digit': 4.0, 'temperature_parity': 2.0, 'kd_loss_weight': 0.9}
SWEEP_LEARNING_RATES = (0.003, 0.01, 0.03)
SWEEP_TEMPERATURES = {'digit': (2.0, 4.0, 8.0), 'parity': (1.0, 2.0, 4.0)}
SWEEP_KD_WEIGHTS = (0.5, 0.9)


def load_data(per_class: int) -> dict[str, MultiTaskDataset]:
    """The students' training split (``per_class`` labels per class, the rest unlabelled), the teachers' (every
    label), validation and test; the same fixed split of scikit-learn's digits for every seed."""
    student = load_digits_splits(per_class=per_class, keep_unlabelled=True)
    teacher = load_digits_splits()
    tasks = list(TASKS)
    return {
        'train': digits_multitask(student.train, tasks),
        'teacher_train': digits_multitask(teacher.train, tasks),
        'val': digits_multitask(student.val, tasks),
        'test': digits_multitask(student.test, tasks),
    }


def digit_teacher() -> MultiTaskClassifier:
    """The class's teacher: a CNN with a single ``digit`` head (151k parameters)."""
    trunk = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
    )
    return MultiTaskClassifier(trunk, {'digit': nn.Linear(128, TASKS['digit'])})


def parity_teacher() -> MultiTaskClassifier:
    """The parity's teacher: an MLP with a single ``parity`` head."""
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    return MultiTaskClassifier(trunk, {'parity': nn.Linear(64, TASKS['parity'])})


def student_model() -> MultiTaskClassifier:
    """The student: a 32-wide hidden layer shared by a head per task."""
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
    return MultiTaskClassifier(trunk, {task: nn.Linear(32, n) for task, n in TASKS.items()})


def accuracy(model: MultiTaskClassifier, data: MultiTaskDataset) -> dict[str, float]:
    """Each of the model's heads' accuracy on ``data``, computed directly."""
    model.eval()
    with torch.no_grad():
        outputs = model({'inputs': data.inputs})
    return {task: (logits.argmax(1) == data.labels[task]).float().mean().item() for task, logits in outputs.items()}


def train_teachers(data: dict[str, MultiTaskDataset], epochs: int, seed: int, device: str) -> dict[str, nn.Module]:
    teachers = {}
    for offset, (task, build) in enumerate((('digit', digit_teacher), ('parity', parity_teacher))):
        reproducibility.seed_all(seed + 1000 * (offset + 1))
        teacher = build()
        train = data['teacher_train']
        Trainer(
            model=teacher,
            train_dataloader=DataLoader(train, batch_size=64, shuffle=True),
            max_duration=f'{epochs}ep',
            optimizers=torch.optim.Adam(teacher.parameters(), lr=0.002),
            device=device,
            seed=seed,
            progress_bar=False,
            log_to_console=False,
        ).fit()
        teachers[task] = teacher.cpu()
    return teachers


def train_student(
    data: dict[str, MultiTaskDataset],
    teachers: Optional[dict[str, nn.Module]],
    settings: dict[str, float],
    batches: int,
    seed: int,
    device: str,
) -> tuple[MultiTaskClassifier, dict[str, float]]:
    """Train the student, distilled from ``teachers`` (one ``Distillation`` per task) or alone (``None``).

    Returns the student and the last logged loss terms.
    """
    reproducibility.seed_all(seed)
    student = student_model()  # the same initialization for both students of a seed
    algorithms = []
    if teachers is not None:
        org_loss_weight = round(1.0 - settings['kd_loss_weight'], 6)
        for i, task in enumerate(TASKS):
            algorithms.append(
                Distillation(
                    teachers[task],
                    KLDivergence(temperature=settings[f'temperature_{task}']),
                    # The student's own loss enters the total once: weighted by the first instance only.
                    org_loss_weight=org_loss_weight if i == 0 else 1.0,
                    kd_loss_weight=settings['kd_loss_weight'],
                    student_logits_key=task,  # the teacher's output {task: logits} is read with the same key
                    name=task,
                )
            )
    labels = data['train'].labels['digit']
    sampler = MixedBatchSampler(labels, labelled_per_batch=16, batch_size=64, seed=seed)
    logger = InMemoryLogger()
    trainer = Trainer(
        model=student,
        train_dataloader=DataLoader(data['train'], batch_sampler=sampler),
        max_duration=f'{batches}ba',
        optimizers=torch.optim.Adam(student.parameters(), lr=settings['lr']),
        algorithms=algorithms,
        loggers=[logger],
        device=device,
        seed=seed,
        progress_bar=False,
        log_to_console=False,
        device_train_microbatch_size=64,
    )
    reproducibility.seed_all(seed)
    trainer.fit()
    trainer.close()
    losses = {k.removeprefix('loss/train/'): float(v[-1][1]) for k, v in logger.data.items() if k.startswith('loss/')}
    return student.cpu(), losses


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {'mean': statistics.fmean(values), 'std': std, 'per_seed': values}


def sweep(
    data: dict[str, MultiTaskDataset], seeds: Sequence[int], teacher_epochs: int, batches: int, device: str, echo
) -> dict[str, Any]:
    """Choose the settings on the validation split (mean of the two tasks' accuracy); test is never looked at."""
    teachers = {seed: train_teachers(data, teacher_epochs, seed, device) for seed in seeds}

    def score(settings: dict[str, float], distilled: bool) -> float:
        values = []
        for seed in seeds:
            student, _ = train_student(data, teachers[seed] if distilled else None, settings, batches, seed, device)
            values.append(statistics.fmean(accuracy(student, data['val']).values()))
        return statistics.fmean(values)

    alone = {lr: score({**DEFAULTS, 'lr': lr}, distilled=False) for lr in SWEEP_LEARNING_RATES}
    for lr, value in alone.items():
        echo(f'student alone, lr {lr:g}: mean val accuracy {100 * value:.2f}%')
    lr = max(alone, key=alone.__getitem__)
    distilled = []
    for t_digit in SWEEP_TEMPERATURES['digit']:
        for t_parity in SWEEP_TEMPERATURES['parity']:
            for weight in SWEEP_KD_WEIGHTS:
                settings = {'lr': lr, 'temperature_digit': t_digit, 'temperature_parity': t_parity}
                settings['kd_loss_weight'] = weight
                value = score(settings, distilled=True)
                distilled.append({**settings, 'val_accuracy': value})
                echo(f'distilled, T digit {t_digit:g}, T parity {t_parity:g}, kd weight {weight:g}: {100 * value:.2f}%')
    best = max(distilled, key=lambda row: row['val_accuracy'])
    chosen = {k: best[k] for k in DEFAULTS}
    return {'seeds': list(seeds), 'student_alone': alone, 'distilled': distilled, 'chosen': chosen}


def report(
    data: dict[str, MultiTaskDataset],
    settings: dict[str, float],
    seeds: Sequence[int],
    teacher_epochs: int,
    batches: int,
    device: str,
    echo,
) -> dict[str, Any]:
    """Per seed: both teachers, the student alone and the distilled student; their test (and val) accuracy."""
    runs = []
    for seed in seeds:
        teachers = train_teachers(data, teacher_epochs, seed, device)
        alone, _ = train_student(data, None, settings, batches, seed, device)
        distilled, losses = train_student(data, teachers, settings, batches, seed, device)
        run = {
            'seed': seed,
            'losses': losses,
            **{
                split: {
                    'teacher': {task: accuracy(teachers[task], data[split])[task] for task in TASKS},
                    'student_alone': accuracy(alone, data[split]),
                    'student_distilled': accuracy(distilled, data[split]),
                }
                for split in ('val', 'test')
            },
        }
        runs.append(run)
        test = run['test']
        echo(
            f'seed {seed}: test '
            + '; '.join(
                f'{task}: teacher {100 * test["teacher"][task]:.2f}%, alone {100 * test["student_alone"][task]:.2f}%, '
                f'distilled {100 * test["student_distilled"][task]:.2f}%'
                for task in TASKS
            )
        )
    summary: dict[str, Any] = {}
    for task in TASKS:
        per_model = {
            model: _stats([run['test'][model][task] for run in runs])
            for model in ('teacher', 'student_alone', 'student_distilled')
        }
        means = {model: stats['mean'] for model, stats in per_model.items()}
        gains = [run['test']['student_distilled'][task] - run['test']['student_alone'][task] for run in runs]
        summary[task] = {
            'test_accuracy': per_model,
            'val_accuracy': {
                model: _stats([run['val'][model][task] for run in runs])
                for model in ('teacher', 'student_alone', 'student_distilled')
            },
            'distilled_minus_alone': {**_stats(gains), 'seeds_better': sum(g > 0 for g in gains)},
            'distillation_ratio': distillation_ratio(
                means['teacher'], means['student_alone'], means['student_distilled']
            ),
        }
    return {'settings': settings, 'seeds': list(seeds), 'tasks': summary, 'runs': runs}


def format_results(results: dict[str, Any]) -> str:
    """The report as a table: per task, each model's test accuracy (mean ± std), the gain and the ratio."""

    def cell(stats: dict[str, Any]) -> str:
        return f'{100 * stats["mean"]:.2f}% ± {100 * stats["std"]:.2f}'

    rows = []
    for task, row in results['tasks'].items():
        gain, ratio = row['distilled_minus_alone'], row['distillation_ratio']
        rows.append(
            [
                task,
                *(cell(row['test_accuracy'][m]) for m in ('teacher', 'student_alone', 'student_distilled')),
                f'{100 * gain["mean"]:+.2f} ({gain["seeds_better"]} of {len(results["seeds"])} seeds better)',
                '-' if ratio is None else f'{ratio:.2f}',
            ]
        )
    headers = ['task', 'teacher', 'student alone', 'distilled', 'distilled - alone (points)', 'ratio']
    return '\n'.join(
        [
            f'Multi-task distillation on scikit-learn digits: test accuracy, mean ± std over seeds {results["seeds"]}',
            f'settings (chosen on validation): {results["settings"]}',
            format_table(headers, rows, right=range(1, 6)),
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, default=5, help='seeds 0..N-1 of the report (default: 5)')
    parser.add_argument('--sweep', action='store_true', help='first choose the settings on the validation split')
    parser.add_argument('--sweep-seeds', type=int, default=3, help='seeds of the sweep (default: 3)')
    parser.add_argument('--teacher-epochs', type=int, default=40, help='epochs of each teacher (default: 40)')
    parser.add_argument('--student-batches', type=int, default=500, help='batches of each student (default: 500)')
    parser.add_argument('--per-class', type=int, default=10, help="labels per class in the students' training data")
    parser.add_argument('--device', default='cpu', help='Composer device (default: cpu)')
    parser.add_argument('--output', help='also write the results as JSON here')
    return parser


def main(argv: Optional[Sequence[str]] = None, echo=print) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # tiny models: a second thread only contends for a shared CPU
    # Composer notes every last, short batch of an epoch; nothing here needs splitting.
    warnings.filterwarnings('ignore', message='Cannot split tensor')
    data = load_data(args.per_class)
    settings = dict(DEFAULTS)
    results: dict[str, Any] = {}
    if args.sweep:
        results['sweep'] = sweep(
            data, range(args.sweep_seeds), args.teacher_epochs, args.student_batches, args.device, echo
        )
        settings = results['sweep']['chosen']
        echo(f'chosen on validation: {settings}')
    results.update(
        report(data, settings, range(args.seeds), args.teacher_epochs, args.student_batches, args.device, echo)
    )
    echo('')
    echo(format_results(results))
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == '__main__':
    main()
