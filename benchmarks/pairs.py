"""The teacher/student pairs the benchmarks time, built offline, and the two ways a benchmark trains on them: a
Composer ``Trainer`` and a hand-written PyTorch step."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from composer import Callback, Trainer
from composer.models import ComposerClassifier, HuggingFaceModel
from torch import nn
from transformers import BertConfig, BertForSequenceClassification


@dataclass
class Pair:
    """Everything a benchmark needs for one pair."""

    name: str
    teacher: nn.Module
    student: nn.Module  # a ComposerModel
    batch: Any  # one batch, reused every step
    teacher_forward: Callable[[nn.Module, Any], torch.Tensor]  # logits
    student_forward: Callable[[nn.Module, Any], torch.Tensor]  # logits, in a plain loop
    labels: Callable[[Any], torch.Tensor]
    description: str
    # Whether the teacher-inference options (bf16, channels-last, compile) are worth timing on this pair.
    time_teacher_options: bool = True


def small_cnn(n_classes: int) -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(3, 32), block(32, 64), block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, n_classes)
    )


def vision_pair(batch_size: int = 64, tiny: bool = False) -> Pair:
    torch.manual_seed(0)
    n_classes = 10
    teacher = torchvision.models.resnet18(num_classes=n_classes) if not tiny else small_cnn(n_classes)
    student = ComposerClassifier(
        small_cnn(n_classes) if not tiny else nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, n_classes)),
        num_classes=n_classes,
    )
    batch = (torch.randn(batch_size, 3, 32, 32), torch.randint(0, n_classes, (batch_size,)))
    description = (
        f'{"ResNet-18" if not tiny else "tiny CNN"} teacher, {"small CNN" if not tiny else "linear"} student, '
        f'3x32x32, batch {batch_size}'
    )
    return _classifier_pair('vision', teacher, student, batch, description)


def _classifier_pair(
    name: str, teacher: nn.Module, student: ComposerClassifier, batch: tuple, description: str, **options: Any
) -> Pair:
    """A pair whose batch is ``(inputs, labels)`` and whose student is a ``ComposerClassifier``."""
    return Pair(
        name=name,
        teacher=teacher,
        student=student,
        batch=batch,
        teacher_forward=lambda model, b: model(b[0]),
        student_forward=lambda model, b: model.module(b[0]),
        labels=lambda b: b[1],
        description=description,
        **options,
    )


def dispatch_pair(batch_size: int = 8) -> Pair:
    """Models so small that a step is dispatch-bound: its time is the host's work per operator, not arithmetic.

    A GPU running millisecond steps is in the same regime (every operator costs a kernel launch of host time), so
    this pair shows on any machine what the per-step cost of the code around the models is.
    """
    torch.manual_seed(0)
    n_features, n_classes = 32, 10
    teacher = nn.Sequential(nn.Linear(n_features, 64), nn.ReLU(), nn.Linear(64, n_classes))
    student = ComposerClassifier(nn.Linear(n_features, n_classes), num_classes=n_classes)
    batch = (torch.randn(batch_size, n_features), torch.randint(0, n_classes, (batch_size,)))
    description = f'MLP 32-64-10 teacher, linear student, batch {batch_size} (dispatch-bound)'
    return _classifier_pair('dispatch', teacher, student, batch, description, time_teacher_options=False)


def bert(layers: int, hidden: int, vocab: int, seq: int) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=seq,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def text_pair(batch_size: int = 16, seq: int = 128, tiny: bool = False) -> Pair:
    torch.manual_seed(0)
    vocab = 8000 if not tiny else 100
    teacher = bert(6, 384, vocab, seq) if not tiny else bert(2, 32, vocab, seq)
    student = HuggingFaceModel(bert(2, 128, vocab, seq) if not tiny else bert(1, 16, vocab, seq), use_logits=True)
    batch = {
        'input_ids': torch.randint(0, vocab, (batch_size, seq)),
        'attention_mask': torch.ones(batch_size, seq, dtype=torch.long),
        'labels': torch.randint(0, 2, (batch_size,)),
    }
    inputs = ('input_ids', 'attention_mask')
    return Pair(
        name='text',
        teacher=teacher,
        student=student,
        batch=batch,
        teacher_forward=lambda model, b: model(**{k: b[k] for k in inputs}).logits,
        student_forward=lambda model, b: model.model(**{k: b[k] for k in inputs}).logits,
        labels=lambda b: b['labels'],
        description=(
            f'BERT {"6x384" if not tiny else "2x32"} teacher, BERT {"2x128" if not tiny else "1x16"} student, '
            f'sequence {seq}, batch {batch_size}'
        ),
    )


def plain_kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``t``, times ``t**2``, averaged over examples."""
    kd = F.kl_div(
        F.log_softmax(student_logits / t, -1),
        F.log_softmax(teacher_logits / t, -1),
        reduction='batchmean',
        log_target=True,
    )
    return kd * t * t


def plain_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, t: float
) -> torch.Tensor:
    """The same objective as the benchmarked Distillation, written directly in PyTorch."""
    return 0.5 * F.cross_entropy(student_logits, labels) + 0.5 * plain_kd_term(student_logits, teacher_logits, t)


def to_device(batch: Any, device: str) -> Any:
    """A tuple or dict batch with every tensor on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return tuple(v.to(device) for v in batch)


def student_trainer(
    pair: Pair,
    algorithms: list,
    device: str,
    steps: int,
    train_dataloader: Any = None,
    callbacks: Sequence[Callback] = (),
) -> Trainer:
    """A ``Trainer`` for a fresh copy of the pair's student, the same in every benchmark: SGD, fp32, the whole batch
    as one microbatch, nothing printed; by default ``steps`` repeats of the pair's batch."""
    student = copy.deepcopy(pair.student)
    return Trainer(
        model=student,
        train_dataloader=[pair.batch] * steps if train_dataloader is None else train_dataloader,
        device_train_microbatch_size=pair.labels(pair.batch).shape[0],
        optimizers=torch.optim.SGD(student.parameters(), lr=0.01),
        algorithms=algorithms,
        callbacks=list(callbacks),
        device='gpu' if device == 'cuda' else 'cpu',
        precision='fp32',
        progress_bar=False,
        log_to_console=False,
        max_duration=f'{steps}ba',
    )


def plain_step(pair: Pair, device: str, with_teacher: bool, temperature: float) -> Callable[[], None]:
    """One training step of a fresh copy of the student in plain PyTorch, alone or distilled (the same objective as
    the benchmarked ``Distillation``, see :func:`plain_kd_loss`), on the pair's batch."""
    student = copy.deepcopy(pair.student).to(device)
    teacher = copy.deepcopy(pair.teacher).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    batch = to_device(pair.batch, device)

    def step() -> None:
        logits = pair.student_forward(student, batch)
        if with_teacher:
            with torch.no_grad():
                teacher_logits = pair.teacher_forward(teacher, batch)
            loss = plain_kd_loss(logits, teacher_logits, pair.labels(batch), temperature)
        else:
            loss = F.cross_entropy(logits, pair.labels(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
