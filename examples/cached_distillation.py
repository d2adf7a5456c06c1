"""Offline distillation: the teacher runs in the first epoch only, its outputs are read back afterwards.

The data are scikit-learn's bundled 8x8 handwritten digits (``composer_kd.recipes.data.load_digits_splits``; nothing is
downloaded). A CNN teacher is trained on the labels first; then an MLP student is distilled with
``Distillation(teacher, teacher_cache=TeacherCache(...))`` over an ``IndexedDataset``, so every example's teacher
logits are recorded the first time it is seen and later epochs skip the teacher. The script prints each distillation
epoch's wall time and how often the teacher ran in it; with ``--compare`` it also distils without the cache (same
seed, same batches) and prints both, with the largest difference between the two students' weights.

Run it with::

    python examples/cached_distillation.py                      # about a minute on 2 idle CPU cores
    python examples/cached_distillation.py --compare            # also without the cache, for the epoch times
    python examples/cached_distillation.py --cache-dir runs/kd-cache --top-k 3   # memory-mapped files, top-3 logits
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from composer_kd import Distillation, IndexedDataset, KLDivergence, TeacherCache
from composer_kd.recipes.data import load_digits_splits

NUM_CLASSES = 10


class EpochClock(Callback):
    """Each epoch's wall time, and how many teacher forward passes it ran."""

    def __init__(self, teacher: nn.Module):
        self.seconds: list[float] = []
        self.teacher_calls: list[int] = []
        self._calls = 0
        self._start = 0.0
        self._hook = teacher.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self._calls += 1

    def epoch_start(self, state, logger) -> None:
        self._calls, self._start = 0, time.perf_counter()

    def epoch_end(self, state, logger) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.teacher_calls.append(self._calls)

    def fit_end(self, state, logger) -> None:
        self._hook.remove()


def build_teacher() -> ComposerClassifier:
    """A CNN for 1x8x8 digits (338 k parameters): the expensive model whose outputs are worth keeping."""
    cnn = nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, NUM_CLASSES),
    )
    return ComposerClassifier(cnn, num_classes=NUM_CLASSES)


def build_student() -> ComposerClassifier:
    """A one-hidden-layer MLP (2,410 parameters)."""
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
    return ComposerClassifier(mlp, num_classes=NUM_CLASSES)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit(
    model: nn.Module,
    dataset: Dataset,
    epochs: int,
    lr: float,
    args: argparse.Namespace,
    algorithms: Sequence[Any] = (),
    callbacks: Sequence[Callback] = (),
) -> Trainer:
    # The sampler's order depends only on (seed, epoch), so runs with and without the cache see the same batches.
    sampler = dist.get_sampler(dataset, shuffle=True, seed=args.seed)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(dataset, batch_size=args.batch_size, sampler=sampler),
        max_duration=f'{epochs}ep',
        optimizers=torch.optim.Adam(model.parameters(), lr=lr),
        algorithms=list(algorithms),
        callbacks=list(callbacks),
        device=args.device,
        seed=args.seed,
        progress_bar=False,
    )
    trainer.fit()
    return trainer


def accuracy(trainer: Trainer, dataset: Dataset) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Cannot split tensor')
        trainer.eval(eval_dataloader=DataLoader(dataset, batch_size=512))
    return float(trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute())


def distil(
    teacher: nn.Module, train_set: Dataset, args: argparse.Namespace, cache: Optional[TeacherCache]
) -> tuple[Trainer, EpochClock]:
    torch.manual_seed(args.seed)
    student = build_student()
    clock = EpochClock(teacher)
    distillation = Distillation(
        teacher,
        KLDivergence(temperature=args.temperature),
        org_loss_weight=0.5,
        kd_loss_weight=0.5,
        teacher_cache=cache,
    )
    data = IndexedDataset(train_set) if cache is not None else train_set
    trainer = fit(student, data, args.student_epochs, 1e-2, args, [distillation], [clock])
    return trainer, clock


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher-epochs', type=int, default=10)
    parser.add_argument('--student-epochs', type=int, default=6)
    parser.add_argument('--max-train-samples', type=int, default=None, help='use only the first N training digits')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--temperature', type=float, default=4.0)
    parser.add_argument('--cache-dir', default=None, help='keep the outputs in memory-mapped files here')
    parser.add_argument('--top-k', type=int, default=None, help='keep only the k largest teacher logits')
    parser.add_argument('--compare', action='store_true', help='also distil without the cache')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', choices=['cpu', 'gpu'], default='gpu' if torch.cuda.is_available() else 'cpu')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the example; return the epoch times, teacher calls per epoch and accuracies it printed."""
    args = parse_args(argv)
    splits = load_digits_splits()
    train_set: Dataset = splits.train
    if args.max_train_samples is not None:
        train_set = Subset(splits.train, range(min(args.max_train_samples, len(splits.train))))

    torch.manual_seed(args.seed)
    teacher = build_teacher()
    teacher_trainer = fit(teacher, train_set, args.teacher_epochs, 2e-3, args)
    results: dict[str, Any] = {
        'train_samples': len(train_set),
        'teacher_params': count_parameters(teacher),
        'student_params': count_parameters(build_student()),
        'teacher_accuracy': accuracy(teacher_trainer, splits.test),
    }
    print(f'teacher  CNN ({results["teacher_params"]:,} parameters): test accuracy {results["teacher_accuracy"]:.4f}')

    cache = TeacherCache(args.cache_dir, top_k=args.top_k)
    cached, clock = distil(teacher, train_set, args, cache)
    results.update(
        cached_epoch_seconds=clock.seconds,
        cached_teacher_calls=clock.teacher_calls,
        cached_accuracy=accuracy(cached, splits.test),
        recorded=cache.n_recorded,
    )
    print(f'student  MLP ({results["student_params"]:,} parameters), distilled with {cache!r}:')
    for epoch, (seconds, calls) in enumerate(zip(clock.seconds, clock.teacher_calls, strict=True), start=1):
        print(f'  epoch {epoch}: {seconds:6.3f} s, teacher ran {calls} times')
    print(f'  test accuracy {results["cached_accuracy"]:.4f}; {cache.n_recorded} examples recorded')

    if args.compare:
        plain, plain_clock = distil(teacher, train_set, args, cache=None)
        results.update(
            plain_epoch_seconds=plain_clock.seconds,
            plain_accuracy=accuracy(plain, splits.test),
            max_weight_difference=max(
                float((a - b).abs().max())
                for a, b in zip(cached.state.model.parameters(), plain.state.model.parameters(), strict=True)
            ),
        )
        print('student  MLP, distilled without the cache (same seed and batches):')
        for epoch, seconds in enumerate(plain_clock.seconds, start=1):
            print(f'  epoch {epoch}: {seconds:6.3f} s')
        later = slice(1, None)
        if len(clock.seconds) > 1:
            ratio = sum(clock.seconds[later]) / sum(plain_clock.seconds[later])
            results['later_epochs_time_ratio'] = ratio
            print(f'  epochs 2+: cached / uncached time {ratio:.3f}')
        print(
            f'  test accuracy {results["plain_accuracy"]:.4f}; largest weight difference to the cached run '
            f'{results["max_weight_difference"]:.2e}'
        )
    return results


if __name__ == '__main__':
    main()
