"""Hugging Face pairs: HuggingFaceModel and PreTrainedModel teachers, dict batches, token-level logits."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from conftest import AfterLossRecorder
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from composer_kd import Distillation, KLDivergence
from composer_kd.models.outputs import is_causal_lm, token_mask

VOCAB, SEQ = 40, 12


def bert_config(layers: int, hidden: int, **kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        # Wider than BERT's 0.02, so logits differ enough for the KL to be well above float32 rounding.
        initializer_range=0.5,
        **kwargs,
    )


def text_batches(n_batches: int = 3, batch_size: int = 4, token_labels: bool = False, seed: int = 0) -> list[dict]:
    """Dict batches with real padding: each row has its own length; padded labels are -100."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.randint(4, SEQ + 1, (batch_size,), generator=generator)
        positions = torch.arange(SEQ).expand(batch_size, SEQ)
        attention_mask = (positions < lengths[:, None]).long()
        input_ids = torch.randint(1, VOCAB, (batch_size, SEQ), generator=generator) * attention_mask
        if token_labels:
            labels = input_ids.clone()
            labels[attention_mask == 0] = -100
            labels[:, 0] = -100  # e.g. a [CLS] position that is never predicted
        else:
            labels = torch.randint(0, 3, (batch_size,), generator=generator)
        batches.append({'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels})
    return batches


def fit(student, algorithm, batches, recorder) -> None:
    Trainer(
        model=student,
        train_dataloader=batches,
        device_train_microbatch_size=4,
        max_duration=f'{len(batches)}ba',
        algorithms=[algorithm],
        callbacks=[recorder],
        progress_bar=False,
        device='cpu',
        seed=3,
    ).fit()


def reference_token_kd(student_logits, teacher_logits, valid, temperature):
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    q = torch.softmax(student_logits.double() / temperature, -1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    return temperature**2 * per_token[valid].mean()


@pytest.mark.parametrize('wrap_teacher', [True, False], ids=['HuggingFaceModel', 'PreTrainedModel'])
def test_sequence_classification_pair(wrap_teacher):
    torch.manual_seed(0)
    teacher_hf = BertForSequenceClassification(bert_config(2, 32, num_labels=3))
    student = HuggingFaceModel(BertForSequenceClassification(bert_config(1, 16, num_labels=3)), use_logits=True)
    teacher = HuggingFaceModel(teacher_hf, use_logits=True) if wrap_teacher else teacher_hf
    recorder = AfterLossRecorder()
    batches = text_batches()
    fit(student, Distillation(teacher, KLDivergence(2.0), 0.5, 0.5), batches, recorder)
    assert len(recorder.steps) == 3
    teacher_hf.eval()  # as during the fit; the fit gave the model back in the train mode it came in
    for step in recorder.steps:
        inputs = {k: step['batch'][k] for k in ('input_ids', 'attention_mask')}
        teacher_logits = teacher_hf(**inputs).logits
        expected = reference_token_kd(
            step['logits'][:, None], teacher_logits[:, None], torch.ones(4, 1, dtype=bool), 2.0
        )
        assert step['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)
        assert 'labels' in step['batch']  # the student's labels stay for its loss and metrics


def test_token_level_logits_count_only_valid_tokens():
    torch.manual_seed(1)
    teacher = BertForMaskedLM(bert_config(2, 32))
    student = HuggingFaceModel(BertForMaskedLM(bert_config(1, 16)), use_logits=True)
    recorder = AfterLossRecorder()
    fit(student, Distillation(teacher, KLDivergence(1.5)), text_batches(token_labels=True), recorder)
    teacher.eval()
    for step in recorder.steps:
        batch = step['batch']
        valid = (batch['attention_mask'] == 1) & (batch['labels'] != -100)
        assert 0 < valid.sum() < valid.numel()
        teacher_logits = teacher(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
        expected = reference_token_kd(step['logits'], teacher_logits, valid, 1.5)
        assert step['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_vocabulary_mismatch_is_reported_with_both_shapes():
    torch.manual_seed(2)
    teacher = BertForMaskedLM(bert_config(1, 16))
    student_config = bert_config(1, 16)
    student_config.vocab_size = VOCAB + 2
    student = HuggingFaceModel(BertForMaskedLM(student_config), use_logits=True)
    with pytest.raises(ValueError, match=rf'\(4, {SEQ}, {VOCAB}\).*\(4, {SEQ}, {VOCAB + 2}\)'):
        fit(student, Distillation(teacher), text_batches(token_labels=True), AfterLossRecorder())


def gpt2(layers: int, hidden: int, vocab: int = VOCAB) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab, n_positions=SEQ, n_embd=hidden, n_layer=layers, n_head=2, initializer_range=0.5
    )
    return GPT2LMHeadModel(config)


def test_causal_mask_judges_each_position_by_the_token_it_predicts():
    batch = {
        'attention_mask': torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        'labels': torch.tensor([[5, -100, 7, 8, -100], [1, 2, 3, -100, 4]]),
    }
    logits = torch.zeros(2, 5, 9)
    # Position i predicts token i+1: row 0 -> 1 is ignored, 2 ok, 3 ok, 4 is padding; the last predicts nothing.
    assert token_mask(batch, logits, causal=True).tolist() == [
        [False, True, True, False, False],
        [True, True, False, True, False],
    ]
    assert token_mask(batch, logits).tolist() == [
        [True, False, True, True, False],
        [True, True, True, False, True],
    ]
    only_attention = {'attention_mask': batch['attention_mask']}
    assert token_mask(only_attention, logits, causal=True).tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
    ]
    assert token_mask({'input_ids': torch.zeros(2, 5)}, logits, causal=True).tolist() == [[True] * 4 + [False]] * 2


def test_causal_lm_distillation_uses_shifted_positions():
    torch.manual_seed(4)
    teacher = gpt2(2, 32)
    student = HuggingFaceModel(gpt2(1, 16), use_logits=True)
    assert is_causal_lm(student) and is_causal_lm(teacher)
    assert not is_causal_lm(HuggingFaceModel(BertForMaskedLM(bert_config(1, 16)), use_logits=True))
    batches = text_batches(token_labels=True)
    recorder = AfterLossRecorder()
    fit(student, Distillation(teacher, KLDivergence(2.0)), batches, recorder)
    teacher.eval()
    for step in recorder.steps:
        batch = step['batch']
        attention, labels = batch['attention_mask'], batch['labels']
        valid = torch.zeros_like(attention, dtype=torch.bool)
        for row in range(attention.shape[0]):
            for i in range(SEQ - 1):
                valid[row, i] = bool(attention[row, i] and attention[row, i + 1] and labels[row, i + 1] != -100)
        teacher_logits = teacher(input_ids=batch['input_ids'], attention_mask=attention).logits
        expected = reference_token_kd(step['logits'], teacher_logits, valid, 2.0)
        assert step['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)
        unshifted = reference_token_kd(step['logits'], teacher_logits, (attention == 1) & (labels != -100), 2.0)
        assert abs(unshifted.item() - expected.item()) > 1e-4  # the shift matters on this data


def test_causal_lm_vocabulary_mismatch_names_both_sizes():
    torch.manual_seed(5)
    student = HuggingFaceModel(gpt2(1, 16, vocab=VOCAB + 8), use_logits=True)
    with pytest.raises(
        ValueError, match=f'the teacher has {VOCAB} classes .vocabulary entries., the student {VOCAB + 8}'
    ):
        fit(student, Distillation(gpt2(1, 16)), text_batches(token_labels=True), AfterLossRecorder())


def test_chunked_kl_in_distillation_matches_the_plain_loss():
    def run(loss_fn):
        torch.manual_seed(7)
        teacher = BertForMaskedLM(bert_config(2, 32))
        student = HuggingFaceModel(BertForMaskedLM(bert_config(1, 16)), use_logits=True)
        recorder = AfterLossRecorder()
        fit(student, Distillation(teacher, loss_fn), text_batches(token_labels=True), recorder)
        return [step['loss']['kd'].item() for step in recorder.steps], student

    plain, plain_student = run(KLDivergence(2.0))
    chunked, chunked_student = run(KLDivergence(2.0, chunk_size=5))
    assert chunked == pytest.approx(plain, rel=1e-5)
    for (name, a), b in zip(plain_student.state_dict().items(), chunked_student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
