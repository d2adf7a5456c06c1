"""Distil a torchvision ResNet-18 into a small CNN on scikit-learn's bundled handwritten digits.

Everything is offline: the data are the 1,797 8x8 grayscale digits that ship inside scikit-learn
(``sklearn.datasets.load_digits``), upsampled to 32x32 and repeated over three channels so that an ImageNet-style
torchvision model takes them unchanged; the models are built from their constructors with no pretrained weights.

The example has three stages, each an ordinary Composer ``Trainer``:

1. train the teacher, a ResNet-18 (``torchvision.models.resnet18(weights=None)``), on the labels;
2. train the student, a CNN with a few thousand parameters, with ``Distillation(teachers=teacher, ...)`` among the
   trainer's algorithms, so its loss is ``org_loss_weight * cross_entropy + kd_loss_weight * KL(teacher || student)``;
3. optionally (``--baseline``), train the same student from the same initialization on the labels alone, to compare.

It demonstrates the API; whether the distilled student beats the baseline depends on the run, and the example
only reports what it measured.

Run it with::

    python examples/vision_distillation.py                      # under a minute on 2 idle CPU cores
    python examples/vision_distillation.py --baseline           # also train the student without distillation
    python examples/vision_distillation.py --teacher-epochs 1 --student-epochs 1 --max-train-samples 64  # seconds
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torchvision
from composer import Algorithm, Trainer
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from composer.optim import CosineAnnealingScheduler, DecoupledAdamW
from composer.utils import reproducibility
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, KLDivergence

NUM_CLASSES = 10
IMAGE_SIZE = 32
# The split never depends on --seed, so runs with different seeds are scored on the same held-out digits.
SPLIT_SEED = 0
TEST_FRACTION = 0.25
KD_LOSS_KEY = 'loss/train/kd'


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All of scikit-learn's digits as ``[N, 3, 32, 32]`` float images in ``[-1, 1]`` and ``[N]`` labels."""
    digits = load_digits()
    # Pixel values are integers 0..16; scale them to [0, 1] before resizing so interpolation stays in range.
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode='bilinear', align_corners=False)
    images = images.repeat(1, 3, 1, 1)  # torchvision classifiers expect RGB
    images = (images - 0.5) / 0.5
    return images, torch.tensor(digits.target, dtype=torch.long)


def split_digits() -> tuple[TensorDataset, TensorDataset]:
    """A fixed, class-stratified train/test split of the digits."""
    images, labels = load_digit_images()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=labels.numpy(),
    )
    return TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[test_idx], labels[test_idx])


def first_samples(dataset: TensorDataset, limit: Optional[int]) -> TensorDataset:
    """The first ``limit`` samples of ``dataset`` (all of them when ``limit`` is ``None``)."""
    if limit is None:
        return dataset
    return TensorDataset(*(tensor[:limit] for tensor in dataset.tensors))


def build_teacher() -> ComposerClassifier:
    """A randomly initialized torchvision ResNet-18 with a 10-class head.

    Its ImageNet stem (a 7x7 stride-2 convolution, then max pooling) is kept: it brings the upsampled 32x32 digits
    back to their native 8x8 resolution before the residual blocks, which is all the detail there is and keeps
    the teacher cheap enough to train on a CPU.
    """
    resnet = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    return ComposerClassifier(resnet, num_classes=NUM_CLASSES)


def build_student() -> ComposerClassifier:
    """A two-block CNN, thousands of times smaller than the teacher."""
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16x16
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, NUM_CLASSES),
    )
    return ComposerClassifier(cnn, num_classes=NUM_CLASSES)


def count_parameters(model: nn.Module) -> int:
    """The number of parameters, trainable or not (Distillation freezes a teacher while it runs)."""
    return sum(p.numel() for p in model.parameters())


def train(
    model: ComposerClassifier,
    train_set: TensorDataset,
    epochs: int,
    lr: float,
    args: argparse.Namespace,
    algorithms: Sequence[Algorithm] = (),
) -> tuple[Trainer, InMemoryLogger]:
    """Fit ``model`` for ``epochs`` epochs and return its trainer and the logger holding every logged value."""
    # A freshly seeded generator per run: the distilled and the baseline student see batches in the same order.
    # Dropping the ragged last batch spares BatchNorm statistics from a handful of images.
    train_loader = DataLoader(
        train_set,
        batch_size=min(args.batch_size, len(train_set)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        max_duration=f'{epochs}ep',
        optimizers=DecoupledAdamW(model.parameters(), lr=lr, weight_decay=1e-5),
        schedulers=CosineAnnealingScheduler(),
        algorithms=list(algorithms),
        loggers=[logger],
        device=args.device,
        seed=args.seed,
        progress_bar=False,
    )
    trainer.fit()
    return trainer, logger


def accuracy(trainer: Trainer, loader: DataLoader) -> float:
    """Top-1 accuracy of the trainer's model on ``loader``, computed by Composer's evaluation loop."""
    with warnings.catch_warnings():
        # Composer warns whenever a batch is smaller than the microbatch size, as the last test batch may be.
        warnings.filterwarnings('ignore', message='Cannot split tensor')
        trainer.eval(eval_dataloader=loader)
    return float(trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute())


def last_logged(logger: InMemoryLogger, key: str) -> float:
    """The most recent value logged under ``key``, or NaN when it was never logged."""
    value: Any = logger.most_recent_values.get(key, math.nan)
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher-epochs', type=int, default=3, help='epochs of ordinary teacher training')
    parser.add_argument('--student-epochs', type=int, default=10, help='epochs of student distillation')
    parser.add_argument('--max-train-samples', type=int, default=None, help='train on the first N digits only')
    parser.add_argument('--max-eval-samples', type=int, default=None, help='evaluate on the first N test digits only')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--temperature', type=float, default=4.0, help='softening temperature of the KL loss')
    parser.add_argument('--org-loss-weight', type=float, default=0.5, help='weight of the cross-entropy on labels')
    parser.add_argument('--kd-loss-weight', type=float, default=0.5, help='weight of the distillation loss')
    parser.add_argument('--baseline', action='store_true', help='also train the student without distillation')
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument(
        '--device',
        choices=['cpu', 'gpu'],
        default='gpu' if torch.cuda.is_available() else 'cpu',
        help='Composer device to train on',
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the example and return its measurements (accuracies, parameter counts, the last logged KD loss)."""
    args = parse_args(argv)
    train_set, test_set = split_digits()
    train_set = first_samples(train_set, args.max_train_samples)
    test_set = first_samples(test_set, args.max_eval_samples)
    test_loader = DataLoader(test_set, batch_size=256)

    # Models are built before any Trainer exists, so seed their initialization explicitly.
    reproducibility.seed_all(args.seed)
    teacher = build_teacher()
    student = build_student()
    baseline = copy.deepcopy(student) if args.baseline else None

    teacher_trainer, _ = train(teacher, train_set, args.teacher_epochs, lr=2e-3, args=args)
    teacher_accuracy = accuracy(teacher_trainer, test_loader)
    print(f'teacher  ResNet-18 ({count_parameters(teacher):,} parameters): test accuracy {teacher_accuracy:.4f}')

    distillation = Distillation(
        teachers=teacher,
        kd_loss_fn=KLDivergence(temperature=args.temperature),
        org_loss_weight=args.org_loss_weight,
        kd_loss_weight=args.kd_loss_weight,
    )
    student_trainer, student_log = train(
        student, train_set, args.student_epochs, lr=1e-2, args=args, algorithms=[distillation]
    )
    results: dict[str, Any] = {
        'teacher_accuracy': teacher_accuracy,
        'student_accuracy': accuracy(student_trainer, test_loader),
        'teacher_params': count_parameters(teacher),
        'student_params': count_parameters(student),
        'final_kd_loss': last_logged(student_log, KD_LOSS_KEY),
        'final_original_loss': last_logged(student_log, 'loss/train/original'),
        'final_train_loss': last_logged(student_log, 'loss/train/total'),
        'train_samples': len(train_set),
        'test_samples': len(test_set),
    }
    print(
        f'student  CNN ({results["student_params"]:,} parameters), distilled: '
        f'test accuracy {results["student_accuracy"]:.4f}, last KD loss {results["final_kd_loss"]:.4f}'
    )

    if baseline is not None:
        baseline_trainer, _ = train(baseline, train_set, args.student_epochs, lr=1e-2, args=args)
        results['baseline_student_accuracy'] = accuracy(baseline_trainer, test_loader)
        print(
            f'student  CNN, labels only (same init and data order): test accuracy '
            f'{results["baseline_student_accuracy"]:.4f}'
        )
    return results


if __name__ == '__main__':
    main()
