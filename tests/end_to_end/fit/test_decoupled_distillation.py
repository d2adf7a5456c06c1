"""DecoupledKD and Standardized inside real Composer fits: the batch's labels reach a loss that takes them."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from conftest import N_CLASSES, AfterLossRecorder, make_dataloader, make_student, make_teacher
from test_nlp import SEQ, gpt2, text_batches

from composer_kd import DecoupledKD, Distillation, KLDivergence, Standardized, decoupled_kd, distillation_loss
from composer_kd.losses.objective import takes_labels


class LabelSpy(torch.nn.Module):
    """A loss that records the labels it receives."""

    def __init__(self):
        super().__init__()
        self.received = []

    def forward(self, student_logits, teacher_logits, labels=None):
        self.received.append(None if labels is None else labels.clone())
        return (student_logits - teacher_logits).pow(2).mean()


def fit(algorithm, dataloader=None, callbacks=(), microbatch=None) -> Trainer:
    trainer = Trainer(
        model=make_student(),
        train_dataloader=dataloader if dataloader is not None else make_dataloader(),
        max_duration='2ba',
        algorithms=[algorithm],
        callbacks=list(callbacks),
        device_train_microbatch_size=microbatch,
        progress_bar=False,
        device='cpu',
        seed=17,
    )
    trainer.fit()
    return trainer


def test_classifier_batches_give_their_targets_to_dkd():
    teacher = make_teacher()
    recorder = AfterLossRecorder()
    fit(Distillation(teacher, DecoupledKD(temperature=2.0, alpha=1.0, beta=3.0)), callbacks=[recorder], microbatch=4)
    assert len(recorder.steps) == 4  # 2 batches of 8 in microbatches of 4: labels follow each microbatch
    teacher.eval()
    for step in recorder.steps:
        with torch.no_grad():
            expected = decoupled_kd(step['outputs'], teacher(step['inputs']), step['targets'], 2.0, 1.0, 3.0)
        assert torch.isclose(step['loss']['kd'], expected, rtol=1e-5)


def test_only_losses_that_take_labels_receive_them():
    spy = LabelSpy()
    assert takes_labels(spy) and not takes_labels(KLDivergence())
    fit(Distillation(make_teacher(), spy))
    expected = [y for _, y in make_dataloader()][:2]
    assert [r.tolist() for r in spy.received] == [y.tolist() for y in expected]
    # Standardized passes them on to a loss that takes them, and to no other.
    inner = LabelSpy()
    fit(Distillation(make_teacher(), Standardized(inner)))
    assert len(inner.received) == 2 and all(r is not None for r in inner.received)


def test_soft_targets_are_not_labels_and_dkd_says_what_it_needs():
    x = torch.randn(16, 6)
    soft = torch.softmax(torch.randn(16, N_CLASSES), -1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, soft), batch_size=8)
    spy = LabelSpy()
    fit(Distillation(make_teacher(), spy), dataloader=loader)
    assert spy.received == [None, None]
    with pytest.raises(ValueError, match='DecoupledKD needs the target class'):
        fit(Distillation(make_teacher(), DecoupledKD()), dataloader=loader)


def test_causal_lm_dkd_targets_are_the_next_tokens():
    torch.manual_seed(4)
    teacher = gpt2(2, 32)
    student = HuggingFaceModel(gpt2(1, 16), use_logits=True)
    recorder = AfterLossRecorder()
    Trainer(
        model=student,
        train_dataloader=text_batches(token_labels=True),
        device_train_microbatch_size=4,
        max_duration='3ba',
        algorithms=[Distillation(teacher, DecoupledKD(temperature=2.0, beta=2.0))],
        callbacks=[recorder],
        progress_bar=False,
        device='cpu',
        seed=3,
    ).fit()
    teacher.eval()
    for step in recorder.steps:
        batch = step['batch']
        attention, labels = batch['attention_mask'], batch['labels']
        targets = torch.full_like(labels, -100)
        valid = torch.zeros_like(attention, dtype=torch.bool)
        for row in range(labels.shape[0]):
            for i in range(SEQ - 1):
                targets[row, i] = labels[row, i + 1]
                valid[row, i] = bool(attention[row, i] and attention[row, i + 1] and labels[row, i + 1] != -100)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch['input_ids'], attention_mask=attention).logits
        expected = decoupled_kd(step['logits'], teacher_logits, targets, 2.0, 1.0, 2.0, mask=valid)
        assert torch.isclose(step['loss']['kd'], expected, rtol=1e-5)


def test_multitask_batches_give_the_tasks_labels():
    batch = {'inputs': torch.randn(4, 6), 'digit': torch.tensor([1, 2, 3, 0]), 'labels': torch.zeros(4).long()}
    from composer_kd.models.outputs import target_labels

    assert target_labels(batch, torch.zeros(4, 5), key='digit').tolist() == [1, 2, 3, 0]
    assert target_labels(batch, torch.zeros(4, 5)).tolist() == [0, 0, 0, 0]


def test_labels_are_selected_with_the_rows_for_a_loss_without_mask():
    spy = LabelSpy()
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.arange(6).reshape(2, 3) % 5
    mask = torch.tensor([[True, False, True], [False, True, False]])
    distillation_loss(s, t, spy, mask=mask, labels=labels)
    assert spy.received[0].tolist() == [0, 2, 4]
