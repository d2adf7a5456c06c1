"""Students built from chosen teacher layers."""

from __future__ import annotations

import pytest
import torch
from composer.models import HuggingFaceModel
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from composer_kd.models.student_init import student_from_teacher_layers


def bert(layers: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32
    )
    return BertForSequenceClassification(config).eval()


def test_keeping_every_layer_reproduces_the_teacher():
    teacher = bert()
    student = student_from_teacher_layers(teacher, [0, 1, 2, 3]).eval()
    x = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(x)
    torch.testing.assert_close(student(x, attention_mask=mask).logits, teacher(x, attention_mask=mask).logits)


def test_chosen_layers_are_copied_in_order_and_the_rest_as_is():
    teacher = bert()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher_layers(HuggingFaceModel(teacher), [3, 1])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert teacher.config.num_hidden_layers == 4
    weights = student.state_dict()
    for key, value in weights.items():
        if key.startswith('bert.encoder.layer.'):
            j, rest = key.removeprefix('bert.encoder.layer.').split('.', 1)
            source = f'bert.encoder.layer.{[3, 1][int(j)]}.{rest}'
        else:
            source = key
        assert torch.equal(value, before[source]), key
    for key, value in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(value, before[key]), key
    # Copies, not shared storage: training the student cannot move the teacher.
    assert weights['bert.embeddings.word_embeddings.weight'].data_ptr() != (
        teacher.state_dict()['bert.embeddings.word_embeddings.weight'].data_ptr()
    )


def test_gpt2_family():
    torch.manual_seed(1)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=30, n_positions=16))
    student = student_from_teacher_layers(teacher, [2])
    assert student.config.n_layer == 1
    assert torch.equal(student.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[2].mlp.c_fc.weight)
    assert torch.equal(student.lm_head.weight, student.transformer.wte.weight)  # ties survive


@pytest.mark.parametrize(('layers', 'message'), [([], 'at least one'), ([0, 4], r'\[4\] are out of range.*0..3')])
def test_bad_layer_choices(layers, message):
    with pytest.raises(ValueError, match=message):
        student_from_teacher_layers(bert(), layers)
