"""``Distillation(fused=...)`` in a stock Composer Trainer: the same training as the unfused path, without logits.

Tiny models built from configs (Hugging Face GPT-2, Llama, BERT masked LM; llm-foundry's MPT) on random token rows
with padding and ignored labels; each fused run is compared with the same run through the unfused path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from composer import Callback, Trainer
from composer.metrics import LanguageCrossEntropy
from composer.models import HuggingFaceModel
from conftest import make_student, make_teacher
from tiny_models import tiny_gpt2, tiny_llama, tiny_mpt
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from composer_kd import (
    CosineSchedule,
    Distillation,
    Fused,
    GeneralizedJSD,
    KLDivergence,
    LinearSchedule,
    TeacherInference,
    get_loss,
)

VOCAB, PAD, SEED = 40, 39, 5


def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
    return tiny_gpt2(layers, width, seed, vocab=VOCAB, pad_token_id=PAD)


def llama(width: int, seed: int) -> Any:
    return tiny_llama(width, seed, vocab=VOCAB, pad_token_id=PAD)


def bert(width: int, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    return BertForMaskedLM(config)


def batches(n: int = 8, masked_lm: bool = False, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Examples of random lengths, right-padded; some labels ignored (-100), as collators give them."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 12, (1,), generator=generator))
        rows.append(torch.randint(0, PAD, (length,), generator=generator))
    input_ids = torch.full((n, 12), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    hidden = torch.rand(input_ids.shape, generator=generator) < (0.6 if masked_lm else 0.15)
    labels = labels.masked_fill(hidden, -100)
    return [{'input_ids': input_ids[i], 'attention_mask': attention_mask[i], 'labels': labels[i]} for i in range(n)]


def loader(masked_lm: bool = False) -> DataLoader:
    return DataLoader(batches(masked_lm=masked_lm), batch_size=4, shuffle=False)


class LossRecorder(Callback):
    def __init__(self):
        self.losses: list[dict[str, float]] = []
        self.logits_strides: list[tuple[int, ...]] = []

    def after_loss(self, state, logger):
        losses = state.loss if isinstance(state.loss, dict) else {'loss': state.loss}
        self.losses.append({k: float(v.detach()) for k, v in losses.items()})
        self.logits_strides.append(tuple(state.outputs['logits'].stride()))


def train(
    student, teacher, fused, kd_loss_fn=None, steps='2ba', masked_lm=False, callbacks=(), distillation=None, **kwargs
) -> Trainer:
    """Train ``student`` from ``teacher`` (or a list of teachers); ``distillation`` adds or overrides arguments of
    ``Distillation``, the rest go to the ``Trainer``."""
    options = {'org_loss_weight': 0.4, 'kd_loss_weight': 0.6, 'temperature': kwargs.pop('temperature', None)}
    trainer = Trainer(
        model=student,
        train_dataloader=loader(masked_lm),
        max_duration=steps,
        algorithms=[
            Distillation(
                teacher,
                kd_loss_fn or KLDivergence(temperature=2.0),
                fused=fused,
                **{**options, **(distillation or {})},
            )
        ],
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        callbacks=list(callbacks),
        progress_bar=False,
        device='cpu',
        seed=SEED,
        **kwargs,
    )
    trainer.fit()
    return trainer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(x, y, atol=atol), f'{name}: max diff {(x - y).abs().max().item()}'


MODELS = {
    'gpt2': (lambda seed: gpt2(1, 16, seed), lambda: gpt2(2, 24, 0), False),
    'llama': (lambda seed: llama(16, seed), lambda: llama(24, 0), False),
    'bert-mlm': (lambda seed: bert(16, seed), lambda: bert(24, 0), True),
}


@pytest.mark.parametrize('kind', sorted(MODELS))
def test_fused_trains_the_same_weights_with_the_same_loss_dict(kind):
    make, make_teacher_model, masked_lm = MODELS[kind]
    recorded = {}
    students = {}
    for fused in (False, True):
        students[fused] = HuggingFaceModel(make(100), use_logits=True)
        recorder = LossRecorder()
        train(students[fused], make_teacher_model(), fused, masked_lm=masked_lm, callbacks=[recorder])
        recorded[fused] = recorder
    for unfused, fused in zip(recorded[False].losses, recorded[True].losses, strict=True):
        assert unfused.keys() == fused.keys() == {'original', 'kd', 'total'}
        for key in unfused:
            assert abs(unfused[key] - fused[key]) < 1e-5, (key, unfused[key], fused[key])
    assert_same_weights(students[False], students[True])
    # The fused run's training logits were zero-stride placeholders: never made.
    assert all(stride == (0, 0, 0) for stride in recorded[True].logits_strides)


def test_microbatches_temperature_schedule_and_generalized_jsd():
    students = {}
    for fused in (False, Fused(chunk_size=5)):
        students[bool(fused)] = HuggingFaceModel(gpt2(1, 16, 100), use_logits=True)
        train(
            students[bool(fused)],
            gpt2(2, 24, 0),
            fused,
            kd_loss_fn=GeneralizedJSD(beta=0.3, temperature=1.0),
            steps='2ba',
            device_train_microbatch_size=2,
            temperature=LinearSchedule(3.0, 1.0),
        )
    assert_same_weights(students[False], students[True])


def test_bf16_autocast_follows_the_unfused_path():
    students = {}
    for fused in (False, True):
        students[fused] = HuggingFaceModel(gpt2(1, 16, 100), use_logits=True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            train(students[fused], gpt2(2, 24, 0), fused, steps='1ba')
    # bf16 logits are rounded differently chunk by chunk only in their last bits; one step of SGD keeps that small.
    assert_same_weights(students[False], students[True], atol=5e-3)


def fused_and_unfused(distillation: dict, make_teachers, steps: str = '4ba') -> dict[bool, tuple]:
    """The student of each path, and the loss terms of every microbatch, after the same training."""
    runs = {}
    for fused in (False, True):
        student = HuggingFaceModel(gpt2(1, 16, 100), use_logits=True)
        recorder = LossRecorder()
        train(student, make_teachers(), fused, steps=steps, callbacks=[recorder], distillation=distillation)
        runs[fused] = (student, recorder.losses)
    return runs


def assert_same_losses(runs: dict[bool, tuple], atol: float = 1e-5) -> None:
    (_, unfused), (_, fused) = runs[False], runs[True]
    assert len(unfused) == len(fused) > 0
    for a, b in zip(unfused, fused, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) < atol, (key, a[key], b[key])


def test_teacher_sampling_and_weight_schedules_follow_the_unfused_path():
    # 2 of 3 teachers per step (a function of the seed and the step: the same teachers on both paths), the
    # weights following schedules over the 4 steps.
    runs = fused_and_unfused(
        {
            'n_teachers_to_sample': 2,
            'org_loss_weight': LinearSchedule(1.0, 0.2),
            'kd_loss_weight': CosineSchedule(0.2, 1.0, start='1ba'),
        },
        lambda: [gpt2(2, 24, 0), gpt2(1, 20, 1), gpt2(2, 16, 2)],
    )
    assert_same_losses(runs)
    assert_same_weights(runs[False][0], runs[True][0])


def sharp_teacher() -> GPT2LMHeadModel:
    """A teacher whose logits are 30 times a random GPT-2's: confident enough that bf16 rounding shows in the loss."""
    teacher = gpt2(2, 24, 0)
    with torch.no_grad():
        teacher.transformer.ln_f.weight.mul_(30)
    return teacher


def test_a_bf16_teacher_copy_follows_the_unfused_path_with_the_same_copy():
    runs = fused_and_unfused({'teacher_inference': TeacherInference(dtype=torch.bfloat16)}, sharp_teacher)
    assert_same_losses(runs)
    assert_same_weights(runs[False][0], runs[True][0])
    # And the bf16 copy is what both paths distilled from: the float32 teacher gives other distillation terms.
    (_, float_teacher) = fused_and_unfused({}, sharp_teacher)[True]
    assert max(abs(a['kd'] - b['kd']) for a, b in zip(runs[True][1], float_teacher, strict=True)) > 1e-3


class EvalLogits(Callback):
    """The student's logits during evaluation, and the eval metric."""

    def __init__(self):
        self.strides = []

    def eval_after_forward(self, state, logger):
        logits = state.outputs if isinstance(state.outputs, torch.Tensor) else state.outputs['logits']
        self.strides.append(tuple(logits.stride()))


def test_evaluation_sees_normal_logits_and_models_are_given_back_unchanged():
    student = HuggingFaceModel(gpt2(1, 16, 100), use_logits=True, eval_metrics=[LanguageCrossEntropy()])
    teacher = gpt2(2, 24, 0)
    recorder = EvalLogits()
    trainer = Trainer(
        model=student,
        train_dataloader=loader(),
        eval_dataloader=loader(),
        eval_interval='1ba',
        max_duration='2ba',
        algorithms=[Distillation(teacher, 'kl', fused=True)],
        callbacks=[recorder],
        progress_bar=False,
        device='cpu',
        seed=SEED,
    )
    trainer.fit()
    assert recorder.strides and all(0 not in stride for stride in recorder.strides)
    for model in (student.model, teacher):
        assert 'forward' not in model.lm_head.__dict__ and not model._forward_pre_hooks
    assert 'loss' not in student.__dict__
    batch = next(iter(loader()))
    student.eval()
    logits = student(batch).logits
    assert logits.stride()[-1] == 1 and torch.count_nonzero(logits) > 0


def test_outside_the_window_the_model_runs_as_usual():
    recorder = LossRecorder()
    student = HuggingFaceModel(gpt2(1, 16, 100), use_logits=True)
    Trainer(
        model=student,
        train_dataloader=loader(),
        max_duration='2ba',
        algorithms=[Distillation(gpt2(2, 24, 0), 'kl', fused=True, start='1ba')],
        callbacks=[recorder],
        progress_bar=False,
        device='cpu',
    ).fit()
    assert recorder.logits_strides[0] != (0, 0, 0) and recorder.logits_strides[1] == (0, 0, 0)


def test_unsupported_settings_are_refused_before_training():
    teacher = gpt2(1, 16, 0)
    with pytest.raises(ValueError, match='LogitsMSE'):
        Distillation(teacher, 'mse', fused=True)
    with pytest.raises(ValueError, match='DecoupledKD'):
        Distillation(teacher, get_loss('dkd'), fused=True)
    with pytest.raises(ValueError, match='feature_pairs'):
        Distillation(teacher, 'kl', fused=True, feature_pairs=[{'student': 'a', 'teacher': 'b'}])
    with pytest.raises(ValueError, match="on_nonfinite_teacher='skip'"):
        Distillation(teacher, 'kl', fused=True, on_nonfinite_teacher='skip')
    with pytest.raises(TypeError, match='fused'):
        Distillation(teacher, 'kl', fused='yes')
    with pytest.raises(ValueError, match='chunk_size'):
        Fused(chunk_size=0)


def test_a_model_whose_output_layer_cannot_be_reached_is_refused_at_fit_start():
    with pytest.raises(ValueError, match='output layer'):
        Trainer(
            model=make_student(),
            train_dataloader=DataLoader(
                [(torch.randn(8), torch.tensor(1)) for _ in range(8)], batch_size=4, shuffle=False
            ),
            max_duration='1ba',
            algorithms=[Distillation(make_teacher(), 'kl', fused=True)],
            progress_bar=False,
            device='cpu',
        ).fit()


def test_another_distillation_in_the_same_trainer_is_refused():
    student = HuggingFaceModel(gpt2(1, 16, 100), use_logits=True)
    with pytest.raises(ValueError, match='only Distillation'):
        Trainer(
            model=student,
            train_dataloader=loader(),
            max_duration='1ba',
            algorithms=[
                Distillation(gpt2(1, 16, 0), 'kl', fused=True, name='a'),
                Distillation(gpt2(1, 16, 1), 'kl', name='b'),
            ],
            progress_bar=False,
            device='cpu',
        )


def test_teacher_with_another_vocabulary_is_refused():
    torch.manual_seed(0)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB + 3, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match='vocabulary'):
        train(HuggingFaceModel(gpt2(1, 16, 100), use_logits=True), other, True, steps='1ba')


def test_logit_softcapping_is_refused():
    model = gpt2(1, 16, 0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match='final_logit_softcapping'):
        train(HuggingFaceModel(model, use_logits=True), gpt2(1, 16, 1), True, steps='1ba')


def test_training_metrics_are_set_aside_with_a_warning_and_given_back():
    student = HuggingFaceModel(gpt2(1, 16, 100), use_logits=True, metrics=[LanguageCrossEntropy()])
    with pytest.warns(UserWarning, match='LanguageCrossEntropy'):
        trainer = train(student, gpt2(1, 16, 0), True, steps='1ba')
    assert list(trainer.state.train_metrics) == ['LanguageCrossEntropy']


def mpt(tied: bool, seed: int, width: int = 16):
    """llm-foundry's ComposerMPTCausalLM, tiny, on the CPU (torch attention and cross-entropy)."""
    return tiny_mpt(width, seed, vocab=VOCAB, tied=tied)


def test_llm_foundry_mpt_untied_trains_as_unfused_and_tied_is_refused():
    pytest.importorskip('llmfoundry')
    students = {}
    for fused in (False, True):
        students[fused] = mpt(tied=False, seed=100)
        train(students[fused], mpt(tied=False, seed=0, width=24).model, fused, steps='2ba')
    assert_same_weights(students[False], students[True])
    with pytest.raises(ValueError, match='tied word embeddings'):
        train(mpt(tied=True, seed=100), mpt(tied=False, seed=0).model, True, steps='1ba')
