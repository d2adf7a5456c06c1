"""Distil a 4-layer BERT into a 2-layer, half-width BERT on a synthetic sequence-classification task.

Everything is offline: both models are ``transformers.BertForSequenceClassification`` built from a ``BertConfig``
(random initialization, no pretrained weights, no tokenizer), wrapped in Composer's ``HuggingFaceModel``; the data
are generated deterministically from a seed.

The task: a sequence of random filler tokens holds one token ``A`` and one token ``B`` at random places; the label
is 1 when ``A`` comes before ``B``. Sequences have different lengths, so batches are padded to their longest row
and carry the ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels`` a BERT classifier takes.

The example has three stages, each an ordinary Composer ``Trainer``:

1. train the teacher on the labels;
2. train the student with ``Distillation(teachers=teacher, ...)`` among the trainer's algorithms: the teacher
   runs on each student batch (without its labels) and the student's loss becomes
   ``org_loss_weight * cross_entropy + kd_loss_weight * KL(teacher || student)``;
3. optionally (``--baseline``), train the same student from the same initialization on the labels alone, to compare.

It demonstrates the API; whether the distilled student beats the baseline depends on the run, and the example
only reports what it measured.

Run it with::

    python examples/nlp_distillation.py                   # about a minute on 2 idle CPU cores
    python examples/nlp_distillation.py --baseline        # also train the student without distillation
    python examples/nlp_distillation.py --teacher-epochs 1 --student-epochs 1 --train-samples 64  # seconds
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from composer import Algorithm, Trainer
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from composer.utils import reproducibility
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy
from transformers import BertConfig, BertForSequenceClassification

from composer_kd import Distillation, KLDivergence

# Token ids: padding, the BERT markers, the two tokens whose order is the label, then filler.
PAD, CLS, SEP, TOKEN_A, TOKEN_B = 0, 1, 2, 3, 4
FIRST_FILLER = 5
VOCAB_SIZE = 32
MIN_CONTENT, MAX_CONTENT = 4, 30  # tokens between [CLS] and [SEP]
MAX_LENGTH = MAX_CONTENT + 2
NUM_LABELS = 2
KD_LOSS_KEY = 'loss/train/kd'
Example = dict[str, torch.Tensor]


class OrderDataset(Dataset):
    """Sequences ``[CLS] ... A ... B ... [SEP]`` (or B first) of varying length, labelled 1 when A precedes B.

    Every sequence is drawn up front from a seeded generator, so a dataset is a pure function of its seed.
    """

    def __init__(self, size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.examples: list[Example] = [self._draw(generator) for _ in range(size)]

    @staticmethod
    def _draw(generator: torch.Generator) -> Example:
        length = int(torch.randint(MIN_CONTENT, MAX_CONTENT + 1, (1,), generator=generator))
        content = torch.randint(FIRST_FILLER, VOCAB_SIZE, (length,), generator=generator)
        where_a, where_b = torch.randperm(length, generator=generator)[:2].tolist()
        content[where_a], content[where_b] = TOKEN_A, TOKEN_B
        input_ids = torch.cat([torch.tensor([CLS]), content, torch.tensor([SEP])])
        return {'input_ids': input_ids, 'labels': torch.tensor(int(where_a < where_b))}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def pad_batch(examples: Sequence[Example]) -> Example:
    """Collate examples into a batch padded to its longest sequence, as a BERT classifier takes it."""
    longest = max(len(example['input_ids']) for example in examples)
    input_ids = torch.full((len(examples), longest), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example['input_ids'])
        input_ids[row, :length] = example['input_ids']
        attention_mask[row, :length] = 1
    return {
        'input_ids': input_ids,
        'attention_mask': attention_mask,
        'token_type_ids': torch.zeros_like(input_ids),  # a single segment
        'labels': torch.stack([example['labels'] for example in examples]),
    }


def build_model(layers: int, hidden: int) -> HuggingFaceModel:
    """A randomly initialized BERT sequence classifier over this task's vocabulary, as a Composer model."""
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=4 * hidden,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=PAD,
        num_labels=NUM_LABELS,
    )
    # use_logits: metrics receive the logits tensor rather than the whole ModelOutput.
    return HuggingFaceModel(
        BertForSequenceClassification(config),
        use_logits=True,
        metrics=[MulticlassAccuracy(num_classes=NUM_LABELS, average='micro')],
    )


def count_parameters(model: torch.nn.Module) -> int:
    """The number of parameters, trainable or not (Distillation freezes a teacher while it runs)."""
    return sum(p.numel() for p in model.parameters())


def train(
    model: HuggingFaceModel,
    dataset: OrderDataset,
    epochs: int,
    lr: float,
    args: argparse.Namespace,
    algorithms: Sequence[Algorithm] = (),
) -> tuple[Trainer, InMemoryLogger]:
    """Fit ``model`` for ``epochs`` epochs and return its trainer and the logger holding every logged value."""
    # A freshly seeded generator per run: the distilled and the baseline student see batches in the same order.
    train_loader = DataLoader(
        dataset,
        batch_size=min(args.batch_size, len(dataset)),
        shuffle=True,
        drop_last=True,
        collate_fn=pad_batch,
        generator=torch.Generator().manual_seed(args.seed),
    )
    # Warmup in batches: Composer would round a fraction of an epoch-long run down to zero epochs.
    warmup_batches = max(1, epochs * len(train_loader) // 10)
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        max_duration=f'{epochs}ep',
        optimizers=DecoupledAdamW(model.parameters(), lr=lr, weight_decay=1e-5),
        # Transformers trained from scratch need a warmup before Adam's full learning rate.
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=f'{warmup_batches}ba'),
        algorithms=list(algorithms),
        loggers=[logger],
        device=args.device,
        seed=args.seed,
        progress_bar=False,
    )
    trainer.fit()
    return trainer, logger


def accuracy(trainer: Trainer, loader: DataLoader) -> float:
    """Accuracy of the trainer's model on ``loader``, computed by Composer's evaluation loop."""
    with warnings.catch_warnings():
        # Composer warns whenever a batch is smaller than the microbatch size, as the last test batch may be.
        warnings.filterwarnings('ignore', message='Cannot split')
        trainer.eval(eval_dataloader=loader)
    return float(trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute())


def last_logged(logger: InMemoryLogger, key: str) -> float:
    """The most recent value logged under ``key``, or NaN when it was never logged."""
    value: Any = logger.most_recent_values.get(key, math.nan)
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher-epochs', type=int, default=6, help='epochs of ordinary teacher training')
    parser.add_argument('--student-epochs', type=int, default=6, help='epochs of student distillation')
    parser.add_argument('--train-samples', type=int, default=2048, help='synthetic training sequences')
    parser.add_argument('--eval-samples', type=int, default=512, help='synthetic held-out sequences')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--temperature', type=float, default=2.0, help='softening temperature of the KL loss')
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
    train_set = OrderDataset(args.train_samples, seed=args.seed)
    # A different seed: held-out sequences are new draws, not copies of training ones.
    eval_loader = DataLoader(OrderDataset(args.eval_samples, seed=args.seed + 1), batch_size=128, collate_fn=pad_batch)

    # Models are built before any Trainer exists, so seed their initialization explicitly.
    reproducibility.seed_all(args.seed)
    teacher = build_model(layers=4, hidden=128)
    student = build_model(layers=2, hidden=64)
    baseline = copy.deepcopy(student) if args.baseline else None

    teacher_trainer, _ = train(teacher, train_set, args.teacher_epochs, lr=1e-3, args=args)
    teacher_accuracy = accuracy(teacher_trainer, eval_loader)
    print(f'teacher  BERT 4x128 ({count_parameters(teacher):,} parameters): held-out accuracy {teacher_accuracy:.4f}')

    distillation = Distillation(
        teachers=teacher,
        kd_loss_fn=KLDivergence(temperature=args.temperature),
        org_loss_weight=args.org_loss_weight,
        kd_loss_weight=args.kd_loss_weight,
    )
    student_trainer, student_log = train(
        student, train_set, args.student_epochs, lr=1e-3, args=args, algorithms=[distillation]
    )
    results: dict[str, Any] = {
        'teacher_accuracy': teacher_accuracy,
        'student_accuracy': accuracy(student_trainer, eval_loader),
        'teacher_params': count_parameters(teacher),
        'student_params': count_parameters(student),
        'final_kd_loss': last_logged(student_log, KD_LOSS_KEY),
        'final_original_loss': last_logged(student_log, 'loss/train/original'),
        'final_train_loss': last_logged(student_log, 'loss/train/total'),
        'train_samples': len(train_set),
        'eval_samples': len(eval_loader.dataset),
    }
    print(
        f'student  BERT 2x64 ({results["student_params"]:,} parameters), distilled: '
        f'held-out accuracy {results["student_accuracy"]:.4f}, last KD loss {results["final_kd_loss"]:.4f}'
    )

    if baseline is not None:
        baseline_trainer, _ = train(baseline, train_set, args.student_epochs, lr=1e-3, args=args)
        results['baseline_student_accuracy'] = accuracy(baseline_trainer, eval_loader)
        print(
            'student  BERT 2x64, labels only (same init and data order): held-out accuracy '
            f'{results["baseline_student_accuracy"]:.4f}'
        )
    return results


if __name__ == '__main__':
    main()
