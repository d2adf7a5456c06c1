"""What a distillation step asks of the host, counted rather than timed: operators and synchronizations.

On a GPU a host synchronization inside the forward or loss computation stalls the host until the device has
caught up, so the next kernels cannot be queued behind the running ones; at millisecond steps every operator
costs a kernel launch of host time. Both are exact counts, so they can be held to bounds here.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Event
from composer.models import ComposerModel
from torch import nn

from benchmarks.host_work import HOST_SYNC, OperatorCounter, measure
from benchmarks.pairs import dispatch_pair
from composer_kd import Distillation, KLDivergence

VOCAB, SEQ, BATCH = 11, 6, 4


class TokenModel(ComposerModel):
    """Token-level logits ``[batch, seq, vocab]`` from a batch dict, with a loss over non-ignored tokens."""

    def __init__(self, width: int):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, batch):
        return self.head(self.embedding(batch['input_ids']))

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs.flatten(0, 1), batch['labels'].flatten(), ignore_index=-100)


def token_batches(n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        attention_mask[:, -2:] = 0  # padding, which the loss must skip
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batches.append({'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels})
    return batches


def counted_by_event(distillation: Distillation) -> dict[str, Counter]:
    """Wrap the instance's ``apply`` so that the operators each event dispatches inside it are counted."""
    counts: dict[str, Counter] = {}
    apply = distillation.apply

    def counting_apply(event, state, logger):
        counter = OperatorCounter()
        with counter:
            apply(event, state, logger)
        counts.setdefault(event.name, Counter()).update(counter.counts)

    distillation.apply = counting_apply
    return counts


def fit(model, batches, distillation: Distillation, microbatch_size: int) -> None:
    Trainer(
        model=model,
        train_dataloader=batches,
        device_train_microbatch_size=microbatch_size,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        algorithms=[distillation],
        max_duration=f'{len(batches)}ba',
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    ).fit()


@pytest.mark.parametrize('on_nonfinite_teacher', ['raise', 'skip'])
@pytest.mark.parametrize('microbatch_size', [BATCH, BATCH // 2])
def test_the_only_host_sync_is_the_finiteness_check_after_the_backward_passes(on_nonfinite_teacher, microbatch_size):
    """Token logits with padding: the masked loss, the teacher call and the flags all stay on the device."""
    teacher = TokenModel(width=16)
    distillation = Distillation(teacher, KLDivergence(2.0), on_nonfinite_teacher=on_nonfinite_teacher)
    counts = counted_by_event(distillation)
    n_batches = 3
    fit(TokenModel(width=4), token_batches(n_batches), distillation, microbatch_size)
    syncs = {event: c[HOST_SYNC] for event, c in counts.items() if c[HOST_SYNC]}
    check_event = 'AFTER_TRAIN_BATCH' if on_nonfinite_teacher == 'raise' else 'BATCH_END'
    assert syncs == {check_event: n_batches}  # one per batch, however many microbatches
    assert sum(counts['AFTER_LOSS'].values()) > 0  # the counter did see the distillation itself


def test_a_default_distillation_handles_two_events_per_step():
    """Every event an algorithm handles costs Composer's engine a trace and a log call."""
    pair = dispatch_pair()
    distillation = Distillation(pair.teacher, KLDivergence(4.0), 0.5, 0.5)
    handled: Counter = Counter()
    apply = distillation.apply

    def recording_apply(event, state, logger):
        handled[event] += 1
        apply(event, state, logger)

    distillation.apply = recording_apply
    fit(pair.student, [pair.batch] * 3, distillation, microbatch_size=8)
    per_step = {event for event in handled if event not in (Event.INIT, Event.FIT_START, Event.FIT_END)}
    assert per_step == {Event.AFTER_LOSS, Event.AFTER_TRAIN_BATCH}
    assert handled[Event.AFTER_LOSS] == handled[Event.AFTER_TRAIN_BATCH] == 3


def test_operators_beyond_a_minimal_distillation_algorithm_stay_few():
    """A whole step with Distillation against one with the least a Composer distillation algorithm can do.

    What remains is ours: the finiteness check (a reduction and a comparison), zeroing of unusable logits and
    terms, and the 0 log 0 guard of the KL divergence, forward and backward. A bound, so that an operator added
    to the hot path is a decision rather than an accident.
    """
    figures = measure(dispatch_pair())['figures']
    assert figures['operators of ours: kd - minimal KD algorithm'] <= 16
    assert figures['host syncs of ours: kd - minimal KD algorithm'] == 1
    assert figures['host syncs Composer adds for a loss term'] == 2  # its .item() of each logged term
    # The minimal algorithm does the plain loop's distillation work, plus Composer's price for the terms.
    plain = figures['operators added: plain kd - plain student']
    loss_term = figures['operators Composer adds for a loss term: loss-term algorithm - student']
    assert figures['operators added: minimal KD algorithm - student step'] == plain + loss_term
