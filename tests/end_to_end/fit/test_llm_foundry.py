"""Distillation built by llm-foundry from YAML: found by its registry, teachers from its model configs, the KD term
on its causal LM outputs equal to the formula written out, and bad input refused before any weight changes."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import random

import numpy as np
import pytest
import torch
import transformers
from composer import Callback, Event, State, Trainer
from composer.loggers import Logger
from composer.utils import reproducibility
from conftest import AfterLossRecorder
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

pytest.importorskip('llmfoundry')

from llmfoundry import registry  # noqa: E402
from llmfoundry.data.dataloader import build_dataloader  # noqa: E402
from llmfoundry.utils.builders import build_algorithm, build_composer_model  # noqa: E402

from composer_kd import Distillation, KLDivergence  # noqa: E402
from composer_kd.llm.foundry import FoundryDistillation, build_teacher, shifts_labels, vocabulary_size  # noqa: E402
from composer_kd.signal.writer import write_signal_shards  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')

VOCAB, SEQ = 48, 10


def mpt_config(d_model: int = 16, n_layers: int = 1, vocab_size: int = VOCAB) -> dict:
    return {
        'name': 'mpt_causal_lm',
        'd_model': d_model,
        'n_heads': 2,
        'n_layers': n_layers,
        'expansion_ratio': 2,
        'max_seq_len': SEQ,
        'vocab_size': vocab_size,
        'attn_config': {'attn_impl': 'torch'},
        'loss_fn': 'torch_crossentropy',
    }


def mpt(seed: int, **sizes) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = mpt_config(**sizes)
    return build_composer_model(config.pop('name'), config, tokenizer=None)


def hf_folder(tmp_path, name: str, vocab_size: int = VOCAB, n_embd: int = 16) -> str:
    """A local folder holding only a tiny GPT-2's config, as llm-foundry's hf_causal_lm reads it."""
    folder = tmp_path / name
    config = transformers.GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, n_positions=SEQ, vocab_size=vocab_size)
    config.save_pretrained(folder)
    return str(folder)


def hf_config(folder: str) -> dict:
    return {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': folder, 'pretrained': False}


def hf(seed: int, folder: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = hf_config(folder)
    return build_composer_model(config.pop('name'), config, tokenizer=None)


def lm_batches(n: int = 8, batch_size: int = 4, seed: int = 3) -> DataLoader:
    """Batches as llm-foundry's collator builds them: input_ids, attention_mask, and labels equal to the ids with
    -100 at padding; some rows right-padded, and one label hidden inside a row."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=generator)
        length = SEQ - (i % 3) * 2
        attention = (torch.arange(SEQ) < length).long()
        ids = torch.where(attention.bool(), ids, torch.zeros_like(ids))
        labels = torch.where(attention.bool(), ids, torch.full_like(ids, -100))
        if i % 2:
            labels[3] = -100
        rows.append({'input_ids': ids, 'attention_mask': attention, 'labels': labels})
    return DataLoader(rows, batch_size=batch_size)


def fit(student, algorithms, max_duration='2ba', callbacks=(), **kwargs) -> Trainer:
    trainer = Trainer(
        model=student,
        train_dataloader=lm_batches(),
        max_duration=max_duration,
        algorithms=algorithms,
        callbacks=list(callbacks),
        progress_bar=False,
        device='cpu',
        seed=17,
        **kwargs,
    )
    trainer.fit()
    return trainer


def kd_written_out(student_logits, teacher_logits, batch, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) averaged over the positions llm-foundry's loss scores: position i predicts token
    i + 1, and counts where token i + 1's label is not -100 and neither token is padding."""
    attention, labels = batch['attention_mask'].bool(), batch['labels']
    counts = torch.zeros_like(attention)
    counts[:, :-1] = attention[:, :-1] & attention[:, 1:] & (labels[:, 1:] != -100)
    p = torch.softmax(teacher_logits / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    per_position = (p * (torch.log(p) - log_q)).sum(-1) * temperature**2
    return per_position[counts].mean()


def teacher_forward(teacher, batch) -> torch.Tensor:
    """The teacher's logits as distillation saw them: in eval mode (no dropout), given the ids and the mask."""
    training = teacher.training
    teacher.eval()
    with torch.no_grad():
        logits = teacher.model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
    teacher.train(training)
    return logits


# --- the registry and the YAML ------------------------------------------------------------------------------------

YAML = """
algorithms:
  distillation:
    teachers:
      - name: mpt_causal_lm
        d_model: 16
        n_heads: 2
        n_layers: 1
        expansion_ratio: 2
        max_seq_len: 10
        vocab_size: 48
        attn_config:
          attn_impl: torch
    kd_loss: kl
    temperature: 2.0
    kd_loss_weight: 0.7
    org_loss_weight: 0.3
    name: lm
"""


def algorithms_from_yaml(text: str) -> list:
    """The algorithms of a training YAML, built as llm-foundry's train script builds them."""
    config = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    return [build_algorithm(str(name), kwargs) for name, kwargs in config['algorithms'].items()]


def test_the_entry_point_is_found_by_llm_foundrys_registry():
    assert registry.algorithms.get('distillation') is FoundryDistillation
    assert 'distillation' in registry.algorithms.get_all()


def test_a_yaml_builds_a_distillation_with_llm_foundry_teachers():
    (algorithm,) = algorithms_from_yaml(YAML)
    assert isinstance(algorithm, Distillation)
    (teacher,) = algorithm.teacher_modules
    assert type(teacher).__name__ == 'ComposerMPTCausalLM'
    assert isinstance(algorithm.kd_loss_fn, KLDivergence) and algorithm.temperature == 2.0
    assert (algorithm.org_loss_weight, algorithm.kd_loss_weight, algorithm.name) == (0.3, 0.7, 'lm')


def test_arguments_of_distillation_pass_through_and_misspellings_are_named():
    signature = inspect.signature(FoundryDistillation)
    passed = set(inspect.signature(Distillation).parameters) - {'teachers', 'kd_loss_fn'}
    assert passed <= set(signature.parameters)
    algorithm = FoundryDistillation([mpt_config()], kd_loss={'name': 'js', 'temperature': 3.0}, end='1ba')
    assert type(algorithm.kd_loss_fn).__name__ == 'JensenShannonDivergence' and algorithm.kd_loss_fn.temperature == 3.0
    with pytest.raises(TypeError, match="did you mean 'kd_loss_weight'"):
        FoundryDistillation([mpt_config()], kd_los_weight=0.5)


# --- the KD term on llm-foundry's outputs ------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['mpt', 'hf'])
def test_the_kd_term_on_causal_lm_outputs_equals_the_formula(kind, tmp_path):
    if kind == 'mpt':
        teacher_config, student = mpt_config(d_model=32), mpt(1)
    else:
        teacher_config = hf_config(hf_folder(tmp_path, 'teacher', n_embd=32))
        student = hf(1, hf_folder(tmp_path, 'student'))
    torch.manual_seed(0)
    distillation = FoundryDistillation([teacher_config], kd_loss='kl', temperature=2.0, kd_loss_weight=0.5)
    (teacher,) = distillation.teacher_modules
    recorder = AfterLossRecorder()
    fit(student, [distillation], callbacks=[recorder])
    assert len(recorder.steps) == 2
    for step in recorder.steps:
        batch = step['batch']
        expected = kd_written_out(step['logits'], teacher_forward(teacher, batch), batch, temperature=2.0)
        torch.testing.assert_close(step['loss']['kd'], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            step['loss']['total'], 1.0 * step['loss']['original'] + 0.5 * step['loss']['kd'], rtol=1e-6, atol=1e-6
        )


def test_an_hf_teacher_teaches_an_mpt_student_of_the_same_vocabulary(tmp_path):
    distillation = FoundryDistillation([hf_config(hf_folder(tmp_path, 'teacher'))], kd_loss='kl', temperature=1.0)
    recorder = AfterLossRecorder()
    fit(mpt(1), [distillation], max_duration='1ba', callbacks=[recorder])
    (step,) = recorder.steps
    teacher_logits = teacher_forward(distillation.teacher_modules[0], step['batch'])
    expected = kd_written_out(step['logits'], teacher_logits, step['batch'], temperature=1.0)
    torch.testing.assert_close(step['loss']['kd'], expected, rtol=1e-5, atol=1e-6)


def test_the_shift_follows_the_students_own_shift_labels(tmp_path):
    assert shifts_labels(mpt(1)) and shifts_labels(hf(1, hf_folder(tmp_path, 'student')))
    unshifted = mpt(1)
    unshifted.shift_labels = False  # labels already shifted by the data: position i is scored against label i
    distillation = FoundryDistillation([mpt_config()], kd_loss='kl', temperature=1.0)
    recorder = AfterLossRecorder()
    fit(unshifted, [distillation], max_duration='1ba', callbacks=[recorder])
    (step,) = recorder.steps
    batch = step['batch']
    teacher = teacher_forward(distillation.teacher_modules[0], batch)
    counts = batch['attention_mask'].bool() & (batch['labels'] != -100)
    p, log_q = torch.softmax(teacher, -1), torch.log_softmax(step['logits'], -1)
    expected = (p * (torch.log(p) - log_q)).sum(-1)[counts].mean()
    torch.testing.assert_close(step['loss']['kd'], expected, rtol=1e-5, atol=1e-6)


# --- teachers: frozen, eval, out of the student's checkpoint, loaded from one ------------------------------------


class TeacherStateRecorder(Callback):
    def __init__(self, teacher):
        self.teacher, self.seen = teacher, []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOSS:
            self.seen.append((self.teacher.training, any(p.requires_grad for p in self.teacher.parameters())))


def test_teachers_are_frozen_in_eval_and_not_in_the_students_checkpoint(tmp_path):
    distillation = FoundryDistillation([mpt_config(d_model=32)], kd_loss='kl')
    (teacher,) = distillation.teacher_modules
    before = copy.deepcopy(teacher.state_dict())
    recorder = TeacherStateRecorder(teacher)
    trainer = fit(mpt(1), [distillation], callbacks=[recorder], save_folder=str(tmp_path / 'ckpt'), save_interval='2ba')
    assert recorder.seen == [(False, False), (False, False)]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    checkpoint = torch.load(tmp_path / 'ckpt' / 'ep0-ba2-rank0.pt', map_location='cpu', weights_only=False)
    student_keys = set(trainer.state.model.state_dict())
    assert set(checkpoint['state']['model']) == student_keys
    assert not any('teacher' in key for key in checkpoint['state']['model'])


def test_a_teacher_loads_the_composer_checkpoint_its_own_training_saved(tmp_path):
    trained = mpt(5, d_model=32)
    Trainer(
        model=trained,
        train_dataloader=lm_batches(),
        max_duration='1ba',
        progress_bar=False,
        device='cpu',
        save_folder=str(tmp_path / 'teacher'),
        save_interval='1ba',
    ).fit()
    path = tmp_path / 'teacher' / 'latest-rank0.pt'
    (algorithm,) = algorithms_from_yaml(
        YAML.replace('d_model: 16', 'd_model: 32').replace(
            '    kd_loss: kl', f'        load_path: {path}\n    kd_loss: kl'
        )
    )
    loaded = algorithm.teacher_modules[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())


# --- the section leaves the student's initialization, and says what it built -------------------------------------


@pytest.mark.parametrize('student_kind', ['mpt', 'hf'])
def test_the_section_leaves_the_students_initial_weights_as_without_it(student_kind, tmp_path):
    """llm-foundry builds the algorithms before the model: with the same seed, the student starts alike with or
    without a distillation section whose teachers are built from the global generator."""
    student_folder, teacher_folder = hf_folder(tmp_path, 'student'), hf_folder(tmp_path, 'teacher', n_embd=32)

    def build_student() -> torch.nn.Module:
        config = mpt_config() if student_kind == 'mpt' else hf_config(student_folder)
        return build_composer_model(config.pop('name'), config, tokenizer=None)

    reproducibility.seed_all(17)
    alone = build_student().state_dict()
    reproducibility.seed_all(17)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    # Through llm-foundry's algorithm registry, as its train script builds the section.
    build_algorithm('distillation', {'teachers': [mpt_config(d_model=32), hf_config(teacher_folder)], 'kd_loss': 'kl'})
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])
    distilled = build_student().state_dict()
    assert list(distilled) == list(alone)
    for name, tensor in alone.items():
        assert torch.equal(distilled[name], tensor), name


def test_rank_zero_logs_each_teacher_built_and_the_load_path_it_loaded(tmp_path, caplog):
    path = tmp_path / 'teacher.pt'
    torch.save(mpt(2).state_dict(), path)
    caplog.set_level(logging.INFO, logger='composer_kd')
    FoundryDistillation([mpt_config(), {**mpt_config(), 'load_path': str(path)}])
    messages = [r.getMessage() for r in caplog.records if r.name == 'composer_kd.llm.foundry']
    assert messages[0].startswith('teachers[0]: built mpt_causal_lm (ComposerMPTCausalLM, ')
    assert messages[1] == 'teachers[0]: no load_path, so it teaches with the weights it was initialised with.'
    assert messages[2].startswith('teachers[1]: built mpt_causal_lm')
    assert messages[3] == f'teachers[1]: loaded its weights from load_path {str(path)!r}.'
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == 'composer_kd.llm.foundry')


def test_the_yamls_python_log_level_reaches_the_teachers_messages(caplog):
    # llm-foundry's train script sets python_log_level on the llmfoundry logger only.
    ours, foundry = logging.getLogger('composer_kd'), logging.getLogger('llmfoundry')
    levels = ours.level, foundry.level
    ours.setLevel(logging.NOTSET)
    foundry.setLevel(logging.INFO)
    try:
        FoundryDistillation([mpt_config()])
        assert any(r.getMessage().startswith('teachers[0]: built mpt_causal_lm') for r in caplog.records)
    finally:
        ours.setLevel(levels[0])
        foundry.setLevel(levels[1])


# --- the teacher_signal loader's split ---------------------------------------------------------------------------


def write_signal(folder) -> None:
    generator = torch.Generator().manual_seed(0)
    write_signal_shards(
        str(folder), torch.randint(0, VOCAB, (4, SEQ), generator=generator), torch.randn(4, SEQ, VOCAB), k=3
    )


def test_split_names_a_subfolder_as_for_the_text_loader(tmp_path):
    write_signal(tmp_path / 'signal' / 'train')
    config = {'name': 'teacher_signal', 'dataset': {'local': str(tmp_path / 'signal'), 'split': 'train'}}
    spec = build_dataloader(config, None, 2)
    assert len(spec.dataloader.dataset) == 4


def test_a_split_kept_from_a_text_loader_is_explained(tmp_path):
    # The signal written to the folder itself, and the text loader's split: train kept.
    write_signal(tmp_path / 'signal')
    dataset = {'local': str(tmp_path / 'signal'), 'split': 'train'}
    with pytest.raises(ValueError, match=r"dataset\.split is 'train', so the shards are read from the subfolder"):
        build_dataloader({'name': 'teacher_signal', 'dataset': dataset}, None, 2)
    with pytest.raises(ValueError, match='set split: null'):
        build_dataloader({'name': 'teacher_signal', 'dataset': dataset}, None, 2)
    remote = {'remote': str(tmp_path / 'signal'), 'local': str(tmp_path / 'cache'), 'split': 'train'}
    with pytest.raises(ValueError, match=r"dataset\.split is 'train'.*Reading it failed"):
        build_dataloader({'name': 'teacher_signal', 'dataset': remote}, None, 2)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_an_unknown_teacher_model_name_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"teachers\[0\]\.name 'mtp_causal_lm' is not a model llm-foundry knows.*"
        r'mpt_causal_lm',
    ):
        FoundryDistillation([{**mpt_config(), 'name': 'mtp_causal_lm'}])
    with pytest.raises(
        ValueError, match=r"'mtp_causal_lm' is not a model llm-foundry knows; did you mean 'mpt_causal_lm'"
    ):
        FoundryDistillation([{**mpt_config(), 'name': 'mtp_causal_lm'}])
    with pytest.raises(ValueError, match=r"teachers\[1\] has no model 'name'"):
        FoundryDistillation([mpt_config(), {'d_model': 16}])


def test_options_that_do_not_combine_are_refused_before_any_teacher_is_built(monkeypatch):
    built = []
    monkeypatch.setattr('composer_kd.llm.foundry.build_composer_model', lambda **kw: built.append(kw))
    with pytest.raises(ValueError, match='^fused cannot be combined with feature_pairs: the fused path reads'):
        FoundryDistillation([mpt_config()], fused=True, feature_pairs=[{'student': 'x', 'teacher': 'y'}])
    with pytest.raises(ValueError, match='^n_teachers_to_sample cannot be combined with teachers=TeacherSignal'):
        FoundryDistillation(teacher_signal=True, n_teachers_to_sample=1)
    assert built == []


def test_a_missing_checkpoint_is_named_before_any_model_is_built(tmp_path, monkeypatch):
    missing = tmp_path / 'nowhere' / 'latest-rank0.pt'
    built = []
    monkeypatch.setattr('composer_kd.llm.foundry.build_composer_model', lambda **kw: built.append(kw))
    with pytest.raises(FileNotFoundError, match=r'teachers\[0\]\.load_path: teacher checkpoint not found: .*nowhere'):
        FoundryDistillation([{**mpt_config(), 'load_path': str(missing)}])
    assert built == []


def test_mismatched_vocabularies_are_refused_naming_both_sizes_before_any_weight_changes(tmp_path):
    student = mpt(1)
    before = copy.deepcopy(student.state_dict())
    distillation = FoundryDistillation([mpt_config(vocab_size=64)], kd_loss='kl')
    with pytest.raises(
        ValueError,
        match=r'teachers\[0\] \(ComposerMPTCausalLM\) scores 64 tokens but the student '
        r'\(ComposerMPTCausalLM\) scores 48',
    ):
        fit(student, [distillation])
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    hf_student = hf(1, hf_folder(tmp_path, 'student', vocab_size=50))
    assert vocabulary_size(hf_student) == 50
    with pytest.raises(ValueError, match='scores 48 tokens but the student .* scores 50'):
        fit(hf_student, [FoundryDistillation([mpt_config()], kd_loss='kl')])


def test_a_teacher_entry_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match=r'teachers\[0\] must be a llm-foundry model config'):
        build_teacher('mpt_causal_lm')
    assert os.environ.get('HF_HUB_OFFLINE', '1')  # nothing here reaches a hub: configs are local folders


def test_teacher_inference_is_read_from_the_yaml():
    from composer_kd import TeacherInference

    entry = {'teachers': [mpt_config()], 'teacher_inference': {'shard': False, 'dtype': 'bfloat16'}}
    distillation = build_algorithm('distillation', entry)
    assert distillation.teacher_inference == TeacherInference(dtype=torch.bfloat16, shard=False)
    assert build_algorithm('distillation', {'teachers': [mpt_config()]}).teacher_inference.shard  # the default
    with pytest.raises(ValueError, match="unknown key 'shrad'.*did you mean 'shard'"):
        build_algorithm('distillation', {'teachers': [mpt_config()], 'teacher_inference': {'shrad': False}})
    with pytest.raises(ValueError, match="teacher_inference.dtype: 'bf16' is not a torch dtype"):
        build_algorithm('distillation', {'teachers': [mpt_config()], 'teacher_inference': {'dtype': 'bf16'}})
