"""On-policy and sequence-level distillation of causal language models in a stock Composer Trainer.

Tiny GPT-2s built from configs (no download) on random token rows whose first ``PROMPT`` tokens are the prompt.
"""

from __future__ import annotations

import math

import pytest
import torch
from composer import Callback, Trainer
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from conftest import make_student
from tiny_models import tiny_gpt2
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForMaskedLM, GPT2LMHeadModel

from composer_kd import (
    Distillation,
    GeneralizedJSD,
    KLDivergence,
    LinearSchedule,
    OnPolicy,
    TeacherCache,
    generalized_jsd,
)
from composer_kd.models.outputs import token_mask
from composer_kd.parts.onpolicy import (
    generate_continuations,
    generative_model,
    is_generated_step,
    on_policy_batch,
    split_prompts,
)

VOCAB, PAD, PROMPT, SEED = 24, 23, 4, 11


def gpt2(layers: int, width: int, seed: int, positions: int = 48) -> GPT2LMHeadModel:
    return tiny_gpt2(layers, width, seed, vocab=VOCAB, positions=positions, pad_token_id=PAD)


def student_model(seed: int = 100) -> HuggingFaceModel:
    return HuggingFaceModel(gpt2(1, 16, seed), use_logits=True, shift_labels=True)


def teacher_model() -> GPT2LMHeadModel:
    return gpt2(2, 32, seed=0)


def token_rows(n: int = 16, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(PROMPT + 2, 14, (n,), generator=generator).tolist()
    return [torch.randint(0, PAD, (length,), generator=generator).tolist() for length in lengths]


def collate(rows: list[list[int]], key: str = 'prompt_length') -> dict[str, torch.Tensor]:
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    batch = {
        'input_ids': input_ids,
        'attention_mask': attention_mask,
        'labels': input_ids.masked_fill(attention_mask == 0, -100),
    }
    if key == 'prompt_length':
        # Prompts of two lengths, so that generated batches hold padding.
        batch['prompt_length'] = torch.tensor([PROMPT - i % 2 for i in range(len(rows))])
    elif key == 'prompt_mask':
        batch['prompt_mask'] = torch.zeros_like(input_ids)
        batch['prompt_mask'][:, :PROMPT] = 1
    return batch


def loader(rows=None, key: str = 'prompt_length', batch_size: int = 8) -> DataLoader:
    return DataLoader(rows or token_rows(), batch_size=batch_size, shuffle=False, collate_fn=lambda r: collate(r, key))


class Recorder(Callback):
    """Keeps, for every training microbatch, the batch, the student's logits and the loss terms."""

    def __init__(self):
        self.steps: list[dict] = []
        self.training_at_forward: list[bool] = []

    def before_forward(self, state, logger):
        self.training_at_forward.append(state.model.training)

    def after_loss(self, state, logger):
        self.steps.append(
            {
                'step': int(state.timestamp.batch),
                'batch': {k: v.clone() for k, v in state.batch.items()},
                'logits': state.outputs['logits'].detach().clone(),
                'loss': {k: v.detach().clone() for k, v in state.loss.items()},
            }
        )


def spy_generate(model, calls: list, state_holder: dict):
    """Record each ``generate`` call: rows, whether the model was in training mode, the trainer's step."""
    original = model.generate

    def generate(*args, **kwargs):
        trainer = state_holder.get('trainer')
        calls.append(
            {
                'rows': kwargs['input_ids'].shape[0],
                'training': model.training,
                'step': None if trainer is None else int(trainer.state.timestamp.batch),
                'evaluating': trainer is not None and trainer.state.dataloader_label == 'eval',
            }
        )
        return original(*args, **kwargs)

    model.generate = generate


def fit(distillation, duration='4ba', student=None, train=None, loggers=(), callbacks=(), **kwargs) -> Trainer:
    student = student or student_model()
    trainer = Trainer(
        model=student,
        train_dataloader=train or loader(),
        max_duration=duration,
        algorithms=[distillation],
        optimizers=torch.optim.AdamW(student.parameters(), lr=1e-2),
        loggers=list(loggers),
        callbacks=list(callbacks),
        progress_bar=False,
        device='cpu',
        seed=SEED,
        **kwargs,
    )
    trainer.fit()
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# The pure functions.


def test_prompts_from_a_length_or_a_mask_on_either_padding_side():
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
    right = collate(rows)
    assert [p.tolist() for p in split_prompts(right)] == [[1, 2, 3, 4], [7, 8, 9]]
    masked = collate(rows, key='prompt_mask')
    assert [p.tolist() for p in split_prompts(masked)] == [[1, 2, 3, 4], [7, 8, 9, 10]]
    left = {
        'input_ids': torch.tensor([[PAD, PAD, 7, 8, 9], [1, 2, 3, 4, 5]]),
        'attention_mask': torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        'prompt_length': torch.tensor([2, 3]),
    }
    assert [p.tolist() for p in split_prompts(left)] == [[7, 8], [1, 2, 3]]


def test_a_batch_without_a_prompt_split_is_refused_clearly():
    batch = collate([[1, 2, 3, 4, 5, 6]], key='none')
    with pytest.raises(ValueError, match="neither: it has no 'prompt_length'.*and no 'prompt_mask'.*attention_mask"):
        split_prompts(batch)
    with pytest.raises(ValueError, match='mappings with input_ids'):
        split_prompts((torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(ValueError, match="Row 0: batch\\['prompt_length'\\] is 9"):
        split_prompts({**batch, 'prompt_length': torch.tensor([9])})
    with pytest.raises(ValueError, match='marks no token'):
        split_prompts({**batch, 'prompt_mask': torch.zeros(1, 6)})


def test_loss_on_generated_batch_counts_continuation_tokens_only():
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    continuations = [torch.tensor([5, 6]), torch.tensor([7, 8, 9])]
    batch = on_policy_batch(prompts, continuations, pad_token_id=PAD)
    assert batch['input_ids'].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, PAD]]
    assert batch['labels'].tolist() == [[-100, -100, -100, 5, 6], [-100, 7, 8, 9, -100]]
    # Causal: position i predicts token i + 1; the counted positions predict exactly the continuations.
    mask = token_mask(batch, torch.zeros(2, 5, VOCAB), causal=True)
    assert mask.tolist() == [[False, False, True, True, False], [True, True, True, False, False]]


def test_generation_is_seeded_restores_modes_and_leaves_the_global_random_state_alone():
    model = gpt2(1, 16, seed=1)
    model.train()
    model.transformer.h[0].attn.eval()  # a submodule deliberately in eval mode stays so
    prompts = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])]
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    first = generate_continuations(model, prompts, max_new_tokens=6, pad_token_id=PAD, seed=9)
    assert torch.equal(torch.rand(1), before)
    second = generate_continuations(model, prompts, max_new_tokens=6, pad_token_id=PAD, seed=9)
    other = generate_continuations(model, prompts, max_new_tokens=6, pad_token_id=PAD, seed=10)
    assert model.training and not model.transformer.h[0].attn.training
    assert [len(c) for c in first] == [6, 6]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
    greedy = generate_continuations(model, prompts, max_new_tokens=6, temperature=0, pad_token_id=PAD, seed=1)
    again = generate_continuations(model, prompts, max_new_tokens=6, temperature=0, pad_token_id=PAD, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(greedy, again, strict=True))


def test_a_prompts_continuation_does_not_depend_on_the_rows_it_is_generated_with():
    model = gpt2(1, 16, seed=3)
    prompts = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([8, 9, 10])]
    together = generate_continuations(model, prompts, max_new_tokens=6, pad_token_id=PAD, seed=4, eos_token_id=[])
    in_twos = generate_continuations(
        model, prompts, max_new_tokens=6, pad_token_id=PAD, seed=4, eos_token_id=[], rows_per_call=2
    )
    reversed_rows = generate_continuations(
        model, prompts[::-1], max_new_tokens=6, pad_token_id=PAD, seed=4, eos_token_id=[]
    )[::-1]
    one_by_one = [
        generate_continuations(model, [prompt], max_new_tokens=6, pad_token_id=PAD, seed=4, eos_token_id=[])[0]
        for prompt in prompts
    ]
    for other in (in_twos, reversed_rows, one_by_one):
        assert all(torch.equal(a, b) for a, b in zip(together, other, strict=True))


def test_the_per_row_draw_samples_the_softened_distribution():
    from composer_kd.parts.generation import _PerRowGumbel

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature, n = 1.5, 20_000
    draws = _PerRowGumbel(list(range(n)), temperature, torch.device('cpu'))
    counts = torch.zeros(4)
    for generator in draws.generators:
        single = _PerRowGumbel([0], temperature, torch.device('cpu'))
        single.generators = [generator]
        counts[int(single(None, scores).argmax())] += 1
    expected = torch.softmax(scores[0] / temperature, -1) * n
    # Each count within 4 standard deviations of its binomial mean.
    assert torch.all((counts - expected).abs() <= 4 * (expected * (1 - expected / n)).sqrt()), (counts, expected)


def test_continuations_stop_after_the_end_of_sequence_token():
    model = gpt2(1, 16, seed=2)
    prompts = [torch.tensor([1, 2, 3])] * 4
    free = generate_continuations(model, prompts, max_new_tokens=8, pad_token_id=PAD, seed=0, eos_token_id=[])
    stop = int(free[0][1])  # the second token of the first row becomes the end of sequence
    cut = generate_continuations(model, prompts, max_new_tokens=8, pad_token_id=PAD, seed=0, eos_token_id=stop)
    assert cut[0].tolist() == free[0][:2].tolist()
    for continuation in cut:
        ends = (continuation == stop).nonzero()
        assert len(ends) == 0 and len(continuation) == 8 or int(ends[0]) == len(continuation) - 1


def test_the_draw_of_generated_batches_is_a_function_of_seed_and_step():
    draws = [is_generated_step(0.3, 5, step) for step in range(2000)]
    assert abs(sum(draws) / 2000 - 0.3) < 0.04
    assert draws != [is_generated_step(0.3, 6, step) for step in range(2000)]
    assert all(is_generated_step(1.0, 5, step) for step in range(50))


# ---------------------------------------------------------------------------------------------------------------
# In a Trainer.


def test_generation_only_on_chosen_batches_in_eval_mode_and_never_during_evaluation():
    student = student_model()
    calls, holder = [], {}
    spy_generate(student.model, calls, holder)
    recorder, logger = Recorder(), InMemoryLogger()
    distillation = Distillation(teacher_model(), KLDivergence(1.0), on_policy=OnPolicy(fraction=0.5, max_new_tokens=5))
    trainer = Trainer(
        model=student,
        train_dataloader=loader(),
        eval_dataloader=loader(),
        eval_interval='1ba',
        max_duration='8ba',
        algorithms=[distillation],
        loggers=[logger],
        callbacks=[recorder],
        progress_bar=False,
        device='cpu',
        seed=SEED,
    )
    holder['trainer'] = trainer
    trainer.fit()
    trainer.eval()
    expected = [step for step in range(8) if is_generated_step(0.5, SEED, step)]
    assert 0 < len(expected) < 8  # both kinds of batches occur in this test
    assert [call['step'] for call in calls] == expected
    assert not any(call['training'] or call['evaluating'] for call in calls)
    assert all(recorder.training_at_forward)  # given back in training mode before its forward pass
    generated = [value for _, value in logger.data['distillation/generated']]
    assert [step for step, flag in enumerate(generated) if flag == 1.0] == expected
    assert len(logger.data['distillation/generation_seconds']) == len(expected)
    # Generated batches hold prompt + continuation; the others are the dataset's batches, untouched.
    rows = token_rows()
    for record in recorder.steps:
        original = collate(rows[(record['step'] % 2) * 8 : (record['step'] % 2 + 1) * 8])
        if record['step'] in expected:
            common = PROMPT - 1  # the shorter prompts' length
            assert torch.equal(record['batch']['input_ids'][:, :common], original['input_ids'][:, :common])
            assert (record['batch']['labels'][:, :common] == -100).all()
            assert record['loss']['total'] == pytest.approx(record['loss']['kd'].item())  # own loss weighted 0
        else:
            assert all(torch.equal(record['batch'][k], v) for k, v in original.items())


@pytest.mark.parametrize(
    'loss_fn', [GeneralizedJSD(beta=0.5, temperature=2.0), KLDivergence(1.0, chunk_size=3)], ids=['gjsd', 'chunked']
)
def test_the_loss_on_generated_tokens_is_the_teachers_score_of_them(loss_fn):
    recorder = Recorder()
    teacher = teacher_model()
    fit(
        Distillation(teacher, loss_fn, org_loss_weight=0.3, on_policy=OnPolicy(max_new_tokens=6)),
        duration='2ba',
        callbacks=[recorder],
    )
    teacher.eval()
    for record in recorder.steps:
        batch = record['batch']
        lengths, prompts = batch['attention_mask'].sum(1), batch['prompt_length']
        assert ((lengths - prompts) == 6).all()  # every continuation generated to its full length
        assert (lengths < batch['input_ids'].shape[1]).any()  # so rows with shorter prompts are padded
        assert (batch['labels'][batch['attention_mask'] == 0] == -100).all()
        # The positions counted: from the prompt's last token to the continuation's second to last.
        valid = torch.zeros_like(batch['attention_mask'], dtype=torch.bool)
        for row, (length, prompt) in enumerate(zip(lengths.tolist(), prompts.tolist(), strict=True)):
            valid[row, prompt - 1 : length - 1] = True
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
        temperature = loss_fn.temperature
        expected = generalized_jsd(
            record['logits'], teacher_logits, beta=getattr(loss_fn, 'beta', 0.0), temperature=temperature, mask=valid
        )
        assert record['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)
        assert record['loss']['total'].item() == pytest.approx(record['loss']['kd'].item(), rel=1e-6)


def test_fraction_zero_reproduces_off_policy_distillation_exactly():
    def run(on_policy):
        logger = InMemoryLogger()
        trainer = fit(
            Distillation(teacher_model(), KLDivergence(2.0), org_loss_weight=0.5, on_policy=on_policy),
            duration='6ba',
            loggers=[logger],
        )
        return trainer, [value for _, value in logger.data['loss/train/total']]

    plain, plain_losses = run(None)
    zero, zero_losses = run(OnPolicy(fraction=0.0))
    assert zero_losses == plain_losses
    for name, value in plain.state.model.state_dict().items():
        torch.testing.assert_close(zero.state.model.state_dict()[name], value, rtol=0, atol=0)


def test_outside_the_distillation_window_nothing_is_generated():
    student = student_model()
    calls = []
    spy_generate(student.model, calls, {})
    fit(
        Distillation(teacher_model(), on_policy=OnPolicy(max_new_tokens=3), start='2ba'),
        duration='4ba',
        student=student,
    )
    assert len(calls) == 2


def test_fraction_follows_a_schedule():
    student = student_model()
    calls, holder = [], {}
    spy_generate(student.model, calls, holder)
    schedule = LinearSchedule(1.0, 0.0, end='4ba')
    distillation = Distillation(teacher_model(), on_policy=OnPolicy(fraction=schedule, max_new_tokens=3))
    trainer = Trainer(
        model=student,
        train_dataloader=loader(),
        max_duration='8ba',
        algorithms=[distillation],
        progress_bar=False,
        device='cpu',
        seed=SEED,
    )
    holder['trainer'] = trainer
    trainer.fit()
    steps = [call['step'] for call in calls]
    assert steps[0] == 0 and all(step < 4 for step in steps)


def test_microbatches_generate_a_microbatch_at_a_time_and_train_as_one_batch():
    def run(microbatch):
        student, calls, recorder = student_model(), [], Recorder()
        spy_generate(student.model, calls, {})
        on_policy = OnPolicy(max_new_tokens=4, temperature=0.0)  # greedy: the same continuations either way
        trainer = fit(
            Distillation(teacher_model(), KLDivergence(1.0), on_policy=on_policy),
            duration='2ba',
            student=student,
            callbacks=[recorder],
            device_train_microbatch_size=microbatch,
        )
        return trainer, calls, recorder

    whole, whole_calls, whole_steps = run(8)
    split, split_calls, split_steps = run(4)
    assert [c['rows'] for c in whole_calls] == [8, 8] and [c['rows'] for c in split_calls] == [4] * 4
    assert len(split_steps.steps) == 4  # two microbatches per batch, each seeing generated tokens
    joined = torch.cat([split_steps.steps[0]['batch']['input_ids'], split_steps.steps[1]['batch']['input_ids']])
    assert torch.equal(joined, whole_steps.steps[0]['batch']['input_ids'])
    for name, value in whole.state.model.state_dict().items():
        torch.testing.assert_close(split.state.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_sequence_level_distillation_trains_on_the_teachers_continuations_generated_once():
    student, teacher = student_model(), teacher_model()
    student_calls, teacher_calls, recorder = [], [], Recorder()
    spy_generate(student.model, student_calls, {})
    spy_generate(teacher, teacher_calls, {})
    on_policy = OnPolicy(source='teacher', max_new_tokens=5, cache_teacher_sequences=True)
    fit(
        Distillation(teacher, KLDivergence(1.0), org_loss_weight=0.5, on_policy=on_policy),
        duration='2ep',
        student=student,
        callbacks=[recorder],
    )
    assert not student_calls
    assert sum(call['rows'] for call in teacher_calls) == 16  # each of the 16 prompts once, over two epochs
    assert len(on_policy.teacher_sequences) == 16
    first_epoch, second_epoch = recorder.steps[:2], recorder.steps[2:]
    for a, b in zip(first_epoch, second_epoch, strict=True):
        assert torch.equal(a['batch']['input_ids'], b['batch']['input_ids'])  # the cached continuations
    for record in recorder.steps:  # the model's own loss on the teacher's text is sequence-level KD: kept
        loss = record['loss']
        assert loss['total'].item() == pytest.approx(0.5 * loss['original'].item() + loss['kd'].item(), rel=1e-5)


def train_with_checkpoints(folder, on_policy, duration, load_path=None) -> Trainer:
    student = student_model()
    trainer = Trainer(
        model=student,
        train_dataloader=loader(),
        max_duration=duration,
        algorithms=[Distillation(teacher_model(), GeneralizedJSD(0.5), org_loss_weight=0.1, on_policy=on_policy)],
        optimizers=torch.optim.AdamW(student.parameters(), lr=1e-2),
        save_folder=str(folder),
        save_filename='ep{epoch}.pt',
        save_interval='1ep',
        load_path=load_path,
        progress_bar=False,
        device='cpu',
        seed=SEED,
        deterministic_mode=True,
    )
    trainer.fit()
    trainer.close()
    return trainer


@pytest.mark.parametrize(
    'options',
    [
        {'fraction': 0.5, 'max_new_tokens': 4},
        {'source': 'teacher', 'max_new_tokens': 4, 'cache_teacher_sequences': True},
    ],
    ids=['student', 'teacher-cached'],
)
def test_resume_mid_run_reproduces_the_uninterrupted_run(tmp_path, options):
    full = train_with_checkpoints(tmp_path / 'full', OnPolicy(**options), '2ep')
    train_with_checkpoints(tmp_path / 'first', OnPolicy(**options), '1ep')
    resumed_options = OnPolicy(**options)
    resumed = train_with_checkpoints(tmp_path / 'second', resumed_options, '2ep', str(tmp_path / 'first' / 'ep1.pt'))
    if resumed_options.cache_teacher_sequences:
        assert len(resumed_options.teacher_sequences) == 16  # read back from the checkpoint
    for name, value in full.state.model.state_dict().items():
        torch.testing.assert_close(resumed.state.model.state_dict()[name], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad settings.


@pytest.mark.parametrize(
    ('options', 'message'),
    [
        ({'fraction': 1.5}, r'fraction .* must lie in \[0, 1\]'),
        ({'fraction': -0.1}, r'fraction .* must lie in \[0, 1\]'),
        ({'fraction': math.nan}, r'fraction .* must lie in \[0, 1\]'),
        ({'fraction': LinearSchedule(0.0, 2.0)}, r'fraction .* must lie in \[0, 1\]'),
        ({'source': 'dataset'}, "source must be 'student'"),
        ({'max_new_tokens': 0}, 'max_new_tokens must be a positive integer'),
        ({'temperature': -1.0}, 'temperature must be >= 0'),
        ({'cache_teacher_sequences': True}, "needs source='teacher'"),
    ],
)
def test_bad_on_policy_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        OnPolicy(**options)


def test_bad_combinations_and_beta_are_refused():
    with pytest.raises(ValueError, match=r'beta must be a number in \[0, 1\]'):
        GeneralizedJSD(beta=1.2)
    with pytest.raises(TypeError, match='on_policy must be an OnPolicy'):
        Distillation(teacher_model(), on_policy={'fraction': 0.5})
    with pytest.raises(ValueError, match='on_policy cannot be combined with teacher_cache'):
        Distillation(teacher_model(), on_policy=OnPolicy(), teacher_cache=TeacherCache())


@pytest.mark.parametrize('kind', ['classifier', 'masked_lm'])
def test_a_student_that_cannot_generate_is_refused_when_the_trainer_is_built(kind):
    if kind == 'classifier':
        student = make_student()
    else:
        config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
        student = HuggingFaceModel(BertForMaskedLM(config), use_logits=True)
    with pytest.raises(ValueError, match='needs a student that generates text'):
        Trainer(
            model=student,
            train_dataloader=loader(),
            max_duration='1ba',
            algorithms=[Distillation(teacher_model(), on_policy=OnPolicy())],
        )


def test_two_algorithms_generating_in_one_trainer_are_refused():
    teacher = teacher_model()
    with pytest.raises(ValueError, match='2 algorithms of this Trainer have on_policy set'):
        Trainer(
            model=student_model(),
            train_dataloader=loader(),
            max_duration='1ba',
            algorithms=[
                Distillation(teacher, on_policy=OnPolicy(), name='a'),
                Distillation(teacher, on_policy=OnPolicy(), name='b'),
            ],
        )


def test_a_teacher_that_cannot_generate_is_refused_for_sequence_level_distillation():
    with pytest.raises(ValueError, match='needs a teacher that generates text'):
        generative_model(torch.nn.Linear(2, 2), 'teacher')
    with pytest.raises(ValueError, match='needs a teacher that generates text'):
        fit(
            Distillation(
                HuggingFaceModel(
                    BertForMaskedLM(
                        BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
                    ),
                    use_logits=True,
                ),
                on_policy=OnPolicy(source='teacher'),
            )
        )


def test_batches_without_a_prompt_split_or_too_long_for_the_model_are_refused():
    with pytest.raises(ValueError, match="no 'prompt_length'"):
        fit(Distillation(teacher_model(), on_policy=OnPolicy()), train=loader(key='none'))
    with pytest.raises(ValueError, match='exceeds the student.s 48 positions'):
        fit(Distillation(teacher_model(), on_policy=OnPolicy(max_new_tokens=46)))
