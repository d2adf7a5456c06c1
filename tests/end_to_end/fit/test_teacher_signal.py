"""Distilling from a teacher signal stored in Streaming shards: the writer, the dataset, resuming, bad input, and
Trainer runs with ``Distillation(TeacherSignal())``."""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
from composer import Callback, State, Trainer
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from tiny_models import tiny_gpt2
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from composer_kd import Distillation, KLDivergence, TeacherSignal
from composer_kd.cache import topk_compress, topk_logits
from composer_kd.models.outputs import token_mask
from composer_kd.signal.shards import SignalDataset, collate_signal
from composer_kd.signal.writer import write_teacher_signal

VOCAB, LENGTH, K = 61, 12, 5


def gpt2(seed: int, vocab: int = VOCAB, width: int = 16) -> GPT2LMHeadModel:
    return tiny_gpt2(1, width, seed, vocab=vocab)


def token_ids(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _release_datasets():
    """Streaming keeps one shared-memory registry per local folder; free it between tests."""
    yield
    gc.collect()


@pytest.fixture
def signal(tmp_path):
    teacher = gpt2(0, width=24)
    tokens = token_ids()
    out = str(tmp_path / 'signal')
    write_teacher_signal(teacher, tokens, out, K, batch_size=5, sequences_per_part=6, progress=False)
    return teacher, tokens, out


def test_shards_give_back_the_teachers_top_k_exactly(signal):
    teacher, tokens, out = signal
    dataset = SignalDataset(local=out, vocab_size=VOCAB)
    assert (dataset.k, dataset.vocab_size, dataset.value_dtype, len(dataset)) == (K, VOCAB, 'float16', 16)
    with torch.no_grad():
        logits = teacher(tokens).logits
    values, indices, log_tail = topk_compress(logits, K)
    for i in range(len(tokens)):
        item = dataset[i]
        assert torch.equal(item['input_ids'], tokens[i])
        assert torch.equal(item['teacher_topk_indices'], indices[i])
        assert torch.equal(item['teacher_topk_logits'], values[i].half().float())
        torch.testing.assert_close(item['teacher_log_tail'], log_tail[i], rtol=0, atol=0)


def test_an_interrupted_write_resumes_where_it_stopped(tmp_path, monkeypatch):
    from composer_kd.signal import writer

    teacher, tokens = gpt2(0, width=24), token_ids()
    out = str(tmp_path / 'signal')
    calls = []
    original = writer._teacher_logits

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the probe, two batches of part 0, then a failure inside part 1
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, '_teacher_logits', failing)
    with pytest.raises(KeyboardInterrupt):
        write_teacher_signal(teacher, tokens, out, K, batch_size=3, sequences_per_part=6, progress=False)
    monkeypatch.setattr(writer, '_teacher_logits', original)
    summary = write_teacher_signal(teacher, tokens, out, K, batch_size=3, sequences_per_part=6, progress=False)
    assert (summary.parts_skipped, summary.parts_written, summary.positions) == (1, 2, 16 * LENGTH)
    reference = str(tmp_path / 'reference')
    write_teacher_signal(teacher, tokens, reference, K, batch_size=3, sequences_per_part=6, progress=False)
    resumed, uninterrupted = SignalDataset(local=out), SignalDataset(local=reference)
    for i in range(16):
        for key, value in uninterrupted[i].items():
            assert torch.equal(resumed[i][key], value), (i, key)


def test_resuming_with_other_options_is_refused(signal):
    teacher, tokens, out = signal
    with pytest.raises(ValueError, match='other options: k 5 then, 6 now'):
        write_teacher_signal(teacher, tokens, out, K + 1, sequences_per_part=6, progress=False)


def test_bad_input_gets_a_clear_error(tmp_path, signal):
    teacher, tokens, out = signal
    with pytest.raises(FileNotFoundError, match='No teacher signal at .*index.json does not exist'):
        SignalDataset(local=str(tmp_path / 'absent'))
    with pytest.raises(ValueError, match=r"vocab_size=50 \(the student's\) does not match .* \(61 classes"):
        SignalDataset(local=out, vocab_size=50)
    with pytest.raises(ValueError, match=r'k=61 must be an integer between 1 and the vocabulary size minus one \(60\)'):
        write_teacher_signal(teacher, tokens, str(tmp_path / 'a'), VOCAB, progress=False)
    with pytest.raises(ValueError, match='61 classes but student_vocab_size=64'):
        write_teacher_signal(teacher, tokens, str(tmp_path / 'b'), K, student_vocab_size=64, progress=False)
    with pytest.raises(ValueError, match='tokenizer has 100 tokens but the teacher only 61'):
        write_teacher_signal(teacher, tokens, str(tmp_path / 'c'), K, tokenizer_size=100, progress=False)
    with pytest.raises(ValueError, match="token id 61 outside the teacher's vocabulary of 61"):
        write_teacher_signal(teacher, torch.full((2, 4), VOCAB), str(tmp_path / 'd'), K, progress=False)
    with pytest.raises(FileNotFoundError, match='tokens: no such file or folder'):
        write_teacher_signal(teacher, str(tmp_path / 'none.pt'), str(tmp_path / 'e'), K, progress=False)
    # A shard named in the index but deleted.
    with open(os.path.join(out, 'index.json')) as f:
        shard = json.load(f)['shards'][1]['raw_data']['basename']
    os.remove(os.path.join(out, shard))
    with pytest.raises(FileNotFoundError, match=f'incomplete: 1 shard file.*{shard}'):
        SignalDataset(local=out)


class _Record(Callback):
    """Keep each batch's input ids, the 'kd' term and the total loss."""

    def __init__(self):
        self.input_ids, self.kd, self.total, self.checked = [], [], [], []

    def after_loss(self, state: State, logger: Logger) -> None:
        self.input_ids.append(state.batch['input_ids'].clone())
        self.kd.append(float(state.loss['kd']))
        self.total.append(float(state.loss['total']))
        if not self.checked:  # the KD term against the formula on dense tensors, on the first batch
            student = state.outputs.logits.detach()
            batch = state.batch
            rebuilt = topk_logits(
                batch['teacher_topk_logits'], batch['teacher_topk_indices'], VOCAB, batch['teacher_log_tail']
            )
            mask = token_mask(batch, student, causal=True)
            p = torch.softmax(rebuilt.double() / 2.0, -1)
            per_position = (p * (p.log() - torch.log_softmax(student.double() / 2.0, -1))).sum(-1) * 4.0
            self.checked.append(per_position[mask].mean().item())


def _trainer(out: str, seed: int = 0, fused: bool = False, **kwargs) -> tuple[Trainer, _Record]:
    dataset = SignalDataset(local=out, vocab_size=VOCAB, shuffle=True, shuffle_seed=3, batch_size=4)
    record = _Record()
    student = HuggingFaceModel(gpt2(100 + seed), use_logits=True, shift_labels=True)
    trainer = Trainer(
        model=student,
        train_dataloader=DataLoader(dataset, batch_size=4, collate_fn=collate_signal),
        max_duration='4ba',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.3),
        algorithms=[Distillation(TeacherSignal(), KLDivergence(temperature=2.0), 0.5, 0.5, fused=fused)],
        callbacks=[] if fused else [record],
        device='cpu',
        seed=seed,
        progress_bar=False,
        **kwargs,
    )
    return trainer, record


@pytest.mark.usefixtures('one_thread')
def test_distillation_trains_from_the_shards_with_no_teacher(signal):
    _, _, out = signal
    trainer, record = _trainer(out)
    trainer.fit()
    assert len(record.kd) == 4 and all(np.isfinite(record.kd))
    assert record.kd[0] == pytest.approx(record.checked[0], rel=1e-4, abs=1e-6)  # float32 against float64
    assert Distillation(TeacherSignal()).teacher_modules == []


@pytest.mark.usefixtures('one_thread')
def test_the_fused_path_trains_from_the_shards_as_the_unfused_path_does(signal):
    _, _, out = signal
    weights, losses = [], []
    for fused in (False, True):
        trainer, _ = _trainer(out, fused=fused)
        seen = []
        trainer.engine.state.callbacks.append(_LossRecorder(seen))
        trainer.fit()
        weights.append({k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()})
        losses.append(seen)
        trainer.close()
    assert len(losses[1]) == 4
    for unfused, fused in zip(*losses, strict=True):
        assert fused == pytest.approx(unfused, rel=1e-5, abs=1e-6)
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)


class _LossRecorder(Callback):
    def __init__(self, seen):
        self.seen = seen

    def after_loss(self, state: State, logger: Logger) -> None:
        self.seen.append((float(state.loss['original']), float(state.loss['kd']), float(state.loss['total'])))


@pytest.mark.usefixtures('one_thread')
def test_mid_epoch_resume_gives_the_same_batches_and_losses(signal, tmp_path):
    _, _, out = signal
    uninterrupted, full = _trainer(out)
    uninterrupted.fit()
    uninterrupted.close()
    del uninterrupted
    gc.collect()

    first, before = _trainer(out, save_folder=str(tmp_path / 'ckpt'), save_interval='2ba')
    first.fit(duration='2ba')
    first.close()
    del first
    gc.collect()
    second, after = _trainer(out, load_path=str(tmp_path / 'ckpt' / 'ep0-ba2-rank0.pt'))
    second.fit()
    ids = before.input_ids + after.input_ids
    assert len(ids) == 4
    for expected, got in zip(full.input_ids, ids, strict=True):
        assert torch.equal(expected, got)
    assert before.total + after.total == pytest.approx(full.total, rel=1e-5)


def test_a_student_with_another_vocabulary_is_refused(signal):
    _, _, out = signal
    dataset = SignalDataset(local=out, batch_size=4)
    student = HuggingFaceModel(gpt2(1, vocab=VOCAB + 3), use_logits=True, shift_labels=True)
    trainer = Trainer(
        model=student,
        train_dataloader=DataLoader(dataset, batch_size=4, collate_fn=collate_signal),
        max_duration='1ba',
        algorithms=[Distillation(TeacherSignal())],
        device='cpu',
        progress_bar=False,
    )
    with pytest.raises(ValueError, match="vocabulary of 61 classes, but the student's logits have 64"):
        trainer.fit()


def test_a_batch_without_the_signal_names_the_missing_key():
    batch = {'input_ids': token_ids(4), 'labels': token_ids(4)}
    with pytest.raises(KeyError, match="needs the batch key 'teacher_topk_indices'.*'input_ids', 'labels'"):
        TeacherSignal().loss(batch, torch.randn(4, LENGTH, VOCAB), 1.0, None)


def test_options_that_need_a_live_teacher_are_refused():
    with pytest.raises(TypeError, match='kd_loss_fn must be a KLDivergence'):
        Distillation(TeacherSignal(), 'js')
    with pytest.raises(ValueError, match='n_teachers_to_sample cannot be combined with teachers=TeacherSignal'):
        Distillation(TeacherSignal(), n_teachers_to_sample=1)


def test_shards_round_trip_through_an_object_store(s3, tmp_path):
    teacher, tokens = gpt2(0, width=24), token_ids(6)
    remote = 's3://teachers/signal'
    write_teacher_signal(
        teacher, tokens, remote, K, sequences_per_part=4, local_dir=str(tmp_path / 'staging'), progress=False
    )
    dataset = SignalDataset(remote=remote, local=str(tmp_path / 'cache'), vocab_size=VOCAB)
    with torch.no_grad():
        indices = teacher(tokens).logits.topk(K).indices
    assert len(dataset) == 6
    for i in range(6):
        assert torch.equal(dataset[i]['teacher_topk_indices'], indices[i])


def test_llm_foundry_builds_the_teacher_signal_loader(signal):
    from llmfoundry.data.dataloader import build_dataloader

    _, tokens, out = signal
    spec = build_dataloader(
        {'name': 'teacher_signal', 'dataset': {'local': out, 'shuffle': False, 'max_seq_len': 8}, 'num_workers': 0},
        tokenizer=None,
        device_batch_size=4,
    )
    batch = next(iter(spec.dataloader))
    assert set(batch) == {
        'input_ids',
        'attention_mask',
        'labels',
        'teacher_topk_indices',
        'teacher_topk_logits',
        'teacher_log_tail',
        'teacher_vocab_size',
    }
    assert batch['teacher_topk_indices'].shape == (4, 8, K)
    assert spec.get_num_tokens_in_batch(batch) == 32


def test_an_mpt_student_distils_from_the_llm_foundry_loader(signal):
    from llmfoundry.data.dataloader import build_dataloader

    _, _, out = signal
    spec = build_dataloader({'name': 'teacher_signal', 'dataset': {'local': out, 'shuffle': True}}, None, 4)
    loss = _mpt_student_fit(spec, Distillation(TeacherSignal(), 'kl'))
    assert set(loss) == {'original', 'kd', 'total'}
    assert np.isfinite(float(loss['kd']))


def _mpt_student_fit(spec, algorithm) -> dict:
    """The loss dict of an MPT student's last step, after two batches from ``spec`` with ``algorithm``."""
    from llmfoundry.models.mpt import ComposerMPTCausalLM

    torch.manual_seed(3)
    student = ComposerMPTCausalLM(
        d_model=16,
        n_heads=2,
        n_layers=1,
        expansion_ratio=2,
        max_seq_len=LENGTH,
        vocab_size=VOCAB,
        attn_config={'attn_impl': 'torch'},
        loss_fn='torch_crossentropy',
    )
    trainer = Trainer(
        model=student,
        train_dataloader=spec,
        max_duration='2ba',
        algorithms=[algorithm],
        device='cpu',
        seed=3,
        progress_bar=False,
    )
    trainer.fit()
    return trainer.state.loss


def test_an_llm_foundry_yaml_distils_from_the_signal(signal):
    """``algorithms: {distillation: {teacher_signal: true, ...}}`` builds Distillation(TeacherSignal()) with the
    YAML's loss, temperature and weights, and trains as that algorithm given in Python does."""
    from llmfoundry.data.dataloader import build_dataloader
    from llmfoundry.utils.builders import build_algorithm

    _, _, out = signal

    def loader():
        return build_dataloader({'name': 'teacher_signal', 'dataset': {'local': out, 'shuffle': False}}, None, 4)

    built = build_algorithm(
        'distillation', {'teacher_signal': True, 'kd_loss': 'kl', 'temperature': 2.0, 'kd_loss_weight': 0.5}
    )
    assert isinstance(built.teacher_signal, TeacherSignal) and built.teacher_modules == []
    from_yaml = float(_mpt_student_fit(loader(), built)['kd'])
    gc.collect()
    in_python = Distillation(TeacherSignal(), KLDivergence(temperature=2.0), kd_loss_weight=0.5, causal_lm=True)
    assert from_yaml == pytest.approx(float(_mpt_student_fit(loader(), in_python)['kd']), rel=1e-6)

    keys = build_algorithm('distillation', {'teacher_signal': {'log_tail_key': 'tail'}})
    assert keys.teacher_signal.log_tail_key == 'tail'


def test_an_llm_foundry_yaml_with_teachers_and_a_signal_is_refused():
    from llmfoundry.utils.builders import build_algorithm

    teacher = {'name': 'mpt_causal_lm', 'd_model': 16, 'n_heads': 2, 'n_layers': 1, 'vocab_size': VOCAB}
    with pytest.raises(ValueError, match='teachers and teacher_signal were both given'):
        build_algorithm('distillation', {'teachers': [teacher], 'teacher_signal': True})
    with pytest.raises(TypeError, match='teacher_signal must be true or a mapping'):
        build_algorithm('distillation', {'teacher_signal': 'yes'})


def _folder(root: str) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), 'rb') as f:
                files[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return files


class _Tokenizer:
    def __init__(self, extra: str = ''):
        self.vocab = {f'tok{i}{extra}': i for i in range(VOCAB)}

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_resuming_with_another_teacher_or_tokenizer_is_refused_naming_both(tmp_path):
    from composer_kd.signal.identity import check_signal_teacher, signal_teacher, teacher_fingerprint

    teacher, tokens, out = gpt2(0, width=24), token_ids(), str(tmp_path / 'signal')
    options = dict(batch_size=5, sequences_per_part=6, progress=False, tokenizer=_Tokenizer())
    write_teacher_signal(teacher, tokens, out, K, **options)
    written = _folder(out)
    recorded = teacher_fingerprint(teacher, _Tokenizer())
    assert signal_teacher(out) == recorded == SignalDataset(local=out).teacher_fingerprint
    assert recorded['weights'].startswith('GPT2LMHeadModel:') and recorded['config'] and recorded['tokenizer']

    other = gpt2(1, width=24)
    with pytest.raises(ValueError, match='another teacher: weights .*GPT2LMHeadModel:.* then, .*GPT2LMHeadModel:'):
        write_teacher_signal(other, tokens, out, K, **options)
    other_name = teacher_fingerprint(other)['weights']
    with pytest.raises(ValueError, match=f"{recorded['weights']}' then, '{other_name}' now"):
        write_teacher_signal(other, tokens, out, K, **options)
    with pytest.raises(ValueError, match=f"tokenizer '{recorded['tokenizer']}' then"):
        write_teacher_signal(teacher, tokens, out, K, **{**options, 'tokenizer': _Tokenizer('x')})
    assert _folder(out) == written  # a refused run changes nothing

    assert check_signal_teacher(out, teacher, _Tokenizer())
    with pytest.warns(UserWarning, match=f'another teacher than the one named: weights .*{other_name}'):
        assert not check_signal_teacher(out, other)


def test_a_part_whose_index_was_cut_short_is_written_again(tmp_path):
    teacher, tokens = gpt2(0, width=24), token_ids()
    options = dict(batch_size=5, sequences_per_part=6, progress=False)
    reference, out = str(tmp_path / 'reference'), str(tmp_path / 'signal')
    write_teacher_signal(teacher, tokens, reference, K, **options)
    write_teacher_signal(teacher, tokens, out, K, **options)
    # A kill while Streaming writes a part's index leaves it empty; a shard cut short is no better.
    open(os.path.join(out, 'part-00001', 'index.json'), 'w').close()
    with open(os.path.join(out, 'part-00002', 'index.json')) as f:
        shard = os.path.join(out, 'part-00002', json.load(f)['shards'][0]['raw_data']['basename'])
    with open(shard, 'r+b') as f:
        f.truncate(10)
    with pytest.warns(UserWarning) as caught:
        summary = write_teacher_signal(teacher, tokens, out, K, **options)
    reported = [str(w.message) for w in caught if 'unreadable or incomplete' in str(w.message)]
    assert len(reported) == 2 and 'part-00001/index.json' in reported[0] and 'not of the' in reported[1]
    assert (summary.parts_written, summary.parts_skipped) == (2, 1)
    assert _folder(out) == _folder(reference)

    open(os.path.join(out, 'index.json'), 'w').close()
    with pytest.raises(ValueError, match=f'unreadable index: {os.path.join(out, "index.json")}'):
        SignalDataset(local=out)


def test_the_teacher_is_given_back_on_its_device(tmp_path, monkeypatch):
    """The teacher runs on another device (meta here) and comes back holding its own parameters on the CPU."""
    import copy

    from composer_kd.signal import writer

    teacher, tokens = gpt2(0, width=24), token_ids(4)
    twin = copy.deepcopy(teacher).eval()
    parameters = dict(teacher.named_parameters())
    pointers = {name: p.data_ptr() for name, p in parameters.items()}
    before = {name: p.detach().clone() for name, p in parameters.items()}
    devices = []

    def logits(self, ids):  # the teacher is on the device; its twin on the host computes what it would
        devices.append(next(self.teacher.parameters()).device.type)
        with torch.no_grad():
            return twin(ids).logits.float()

    monkeypatch.setattr(writer._TeacherPass, 'logits', logits)
    teacher.train()
    write_teacher_signal(teacher, tokens, str(tmp_path / 'signal'), K, device='meta', progress=False)
    assert set(devices) == {'meta'}
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert dict(teacher.named_parameters()) == parameters  # the same objects
    for name, p in teacher.named_parameters():
        assert p.device.type == 'cpu' and p.data_ptr() == pointers[name] and torch.equal(p, before[name])
    assert all(b.device.type == 'cpu' for b in teacher.buffers())


def test_the_kept_mass_is_recorded_per_part_and_warned_about(tmp_path, capsys):
    teacher, tokens, out = gpt2(0, width=24), token_ids(), str(tmp_path / 'signal')
    with pytest.warns(UserWarning, match=r'top 5 logits keep 0\.\d+ of the teacher probability on average'):
        summary = write_teacher_signal(teacher, tokens, out, K, batch_size=5, sequences_per_part=6)
    assert 'kept_mass=' in capsys.readouterr().err  # on the progress bar
    with torch.no_grad():
        kept = teacher(tokens).logits.softmax(-1).topk(K).values.sum(-1).double()  # [16, 12]
    with open(os.path.join(out, 'teacher_signal.json')) as f:
        recorded = json.load(f)['kept_mass']
    assert recorded['mean'] == pytest.approx(float(kept.mean()), rel=1e-5) == summary.kept_mass
    assert recorded['parts'] == pytest.approx(
        {
            'part-00000': float(kept[:6].mean()),
            'part-00001': float(kept[6:12].mean()),
            'part-00002': float(kept[12:].mean()),
        },
        rel=1e-5,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        write_teacher_signal(teacher, tokens, str(tmp_path / 'b'), K, progress=False, kept_mass_warning=0.05)


def test_another_teacher_is_refused_at_an_object_store_even_with_a_new_staging_folder(s3, tmp_path):
    tokens, remote = token_ids(6), 's3://teachers/refused'
    options = dict(sequences_per_part=4, progress=False)
    write_teacher_signal(gpt2(0, width=24), tokens, remote, K, local_dir=str(tmp_path / 'first'), **options)
    stored = s3.get_object(Bucket='teachers', Key='refused/teacher_signal.json')['Body'].read()
    with pytest.raises(ValueError, match='written by another teacher: weights'):
        write_teacher_signal(gpt2(1, width=24), tokens, remote, K, local_dir=str(tmp_path / 'second'), **options)
    assert s3.get_object(Bucket='teachers', Key='refused/teacher_signal.json')['Body'].read() == stored


def test_a_signal_recorded_without_its_teacher_is_refused_on_resume(tmp_path):
    """A folder whose ``teacher_signal.json`` has no ``teacher`` field (written before teachers were recorded)."""
    teacher, tokens, out = gpt2(0, width=24), token_ids(), str(tmp_path / 'signal')
    options = dict(batch_size=5, sequences_per_part=6, progress=False, kept_mass_warning=0.05)
    write_teacher_signal(teacher, tokens, out, K, **options)
    settings_path = os.path.join(out, 'teacher_signal.json')
    with open(settings_path) as f:
        settings = json.load(f)
    del settings['teacher']
    with open(settings_path, 'w') as f:
        json.dump(settings, f)
    written = _folder(out)
    with pytest.raises(ValueError, match=r'written by another teacher: weights None then'):
        write_teacher_signal(teacher, tokens, out, K, **options)
    assert _folder(out) == written  # nothing rewritten
