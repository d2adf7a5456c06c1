"""Feature and attention distillation: match a student CNN's feature maps to its teacher's, not just its logits.

Data: scikit-learn's bundled 8x8 handwritten digits (``composer_kd.recipes.data.load_digits_splits``: 1,797 images,
stratified train / validation / test splits), nothing downloaded. Teacher: a CNN with 32 and 64 channels. Student:
a CNN with 8 and 16 channels. Both name their convolution stack ``features``, so one ``FeaturePair`` names the
two modules whose outputs are compared:

* ``--feature-loss mse`` (default) or ``cosine``: the student's 16-channel maps are mapped to the teacher's 64
  channels by a learned 1x1 projection that ``Distillation`` creates, trains with the student's optimizer and
  takes back when the fit ends (the student is returned exactly as built);
* ``--feature-loss attention_map``: attention transfer (Zagoruyko & Komodakis): where in the image each network
  puts its activation, compared after normalization, so channel counts need not match and nothing is learned;
* ``--feature-loss none``: logits only, for comparison.

The logit term (``KLDivergence``) is kept alongside; each term is logged separately (``loss/train/kd``,
``loss/train/feature_0``). With ``--baseline`` the same student is also trained on the labels alone.

Run it with::

    python examples/feature_distillation.py --baseline                      # about a minute on 2 CPU cores
    python examples/feature_distillation.py --feature-loss attention_map
    python examples/feature_distillation.py --teacher-epochs 1 --student-epochs 1 --max-train-samples 64  # seconds
"""

from __future__ import annotations

import argparse
import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional

import torch
from composer import Algorithm, Trainer
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from composer.utils import reproducibility
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, FeaturePair, KLDivergence
from composer_kd.recipes.data import load_digits_splits

NUM_CLASSES = 10


def cnn(channels: tuple[int, int], hidden: Optional[int]) -> ComposerClassifier:
    """Two 3x3 convolutions named ``features``, a 2x2 max-pool, then a classifier head."""
    features = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, channels[0], 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(channels[0], channels[1], 3, padding=1),
            relu2=nn.ReLU(),
        )
    )
    width = channels[1] * 4 * 4
    head: list[nn.Module] = [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)] if hidden else []
    model = nn.Sequential(
        OrderedDict(
            features=features,
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            head=nn.Sequential(*head) if head else nn.Linear(width, NUM_CLASSES),
        )
    )
    return ComposerClassifier(model, num_classes=NUM_CLASSES)


def build_teacher() -> ComposerClassifier:
    return cnn((32, 64), hidden=128)


def build_student() -> ComposerClassifier:
    return cnn((8, 16), hidden=None)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def first(dataset: TensorDataset, limit: Optional[int]) -> TensorDataset:
    return dataset if limit is None else TensorDataset(*(t[:limit] for t in dataset.tensors))


def train(
    model: ComposerClassifier,
    train_set: TensorDataset,
    epochs: int,
    lr: float,
    args: argparse.Namespace,
    algorithms: Sequence[Algorithm] = (),
) -> tuple[Trainer, InMemoryLogger]:
    loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=f'{epochs}ep',
        optimizers=torch.optim.Adam(model.parameters(), lr=lr),
        algorithms=list(algorithms),
        loggers=[logger],
        device=args.device,
        seed=args.seed,
        progress_bar=False,
    )
    trainer.fit()
    return trainer, logger


def accuracy(trainer: Trainer, dataset: TensorDataset) -> float:
    trainer.eval(eval_dataloader=DataLoader(dataset, batch_size=512))
    return float(trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute())


def last_logged(logger: InMemoryLogger, key: str) -> float:
    value: Any = logger.most_recent_values.get(key, math.nan)
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def feature_pairs(loss: str, weight: float) -> list[FeaturePair]:
    if loss == 'none':
        return []
    # The same path in both models: the output of the convolution stack, [batch, channels, 8, 8].
    return [FeaturePair(student='features', teacher='features', loss=loss, weight=weight)]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--feature-loss', choices=['mse', 'cosine', 'attention_map', 'none'], default='mse')
    parser.add_argument('--feature-weight', type=float, default=1.0, help='weight of the feature term')
    parser.add_argument('--teacher-epochs', type=int, default=20)
    parser.add_argument('--student-epochs', type=int, default=20)
    parser.add_argument('--max-train-samples', type=int, default=None, help='train on the first N digits only')
    parser.add_argument('--max-eval-samples', type=int, default=None, help='evaluate on the first N test digits only')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--temperature', type=float, default=4.0)
    parser.add_argument('--org-loss-weight', type=float, default=0.5)
    parser.add_argument('--kd-loss-weight', type=float, default=0.5)
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
    """Run the example; return test accuracies, parameter counts and the last logged loss terms."""
    args = parse_args(argv)
    splits = load_digits_splits()
    train_set = first(splits.train, args.max_train_samples)
    test_set = first(splits.test, args.max_eval_samples)

    reproducibility.seed_all(args.seed)
    teacher, student = build_teacher(), build_student()
    baseline = copy.deepcopy(student) if args.baseline else None
    student_parameters = {name for name, _ in student.named_parameters()}

    teacher_trainer, _ = train(teacher, train_set, args.teacher_epochs, lr=2e-3, args=args)
    teacher_accuracy = accuracy(teacher_trainer, test_set)
    print(f'teacher  CNN 32/64 ({count_parameters(teacher):,} parameters): test accuracy {teacher_accuracy:.4f}')

    distillation = Distillation(
        teachers=teacher,
        kd_loss_fn=KLDivergence(temperature=args.temperature),
        org_loss_weight=args.org_loss_weight,
        kd_loss_weight=args.kd_loss_weight,
        feature_pairs=feature_pairs(args.feature_loss, args.feature_weight),
    )
    student_trainer, log = train(student, train_set, args.student_epochs, lr=1e-2, args=args, algorithms=[distillation])
    # The projection was trained alongside the student and is gone from it now.
    assert {name for name, _ in student.named_parameters()} == student_parameters
    results: dict[str, Any] = {
        'teacher_accuracy': teacher_accuracy,
        'student_accuracy': accuracy(student_trainer, test_set),
        'teacher_params': count_parameters(teacher),
        'student_params': count_parameters(student),
        'projection_params': count_parameters(distillation.projections),
        'final_kd_loss': last_logged(log, 'loss/train/kd'),
        'final_feature_loss': last_logged(log, 'loss/train/feature_0'),
        'final_original_loss': last_logged(log, 'loss/train/original'),
        'final_train_loss': last_logged(log, 'loss/train/total'),
        'train_samples': len(train_set),
        'test_samples': len(test_set),
    }
    print(
        f'student  CNN 8/16 ({results["student_params"]:,} parameters), distilled with {args.feature_loss} '
        f'features ({results["projection_params"]:,} projection parameters): test accuracy '
        f'{results["student_accuracy"]:.4f}'
    )
    if baseline is not None:
        baseline_trainer, _ = train(baseline, train_set, args.student_epochs, lr=1e-2, args=args)
        results['baseline_student_accuracy'] = accuracy(baseline_trainer, test_set)
        print(
            f'student  CNN 8/16, labels only (same init and batches): test accuracy '
            f'{results["baseline_student_accuracy"]:.4f}'
        )
    return results


if __name__ == '__main__':
    main()
