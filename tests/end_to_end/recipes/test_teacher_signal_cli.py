"""``composer-kd teacher-signal``: from a saved Hugging Face teacher and llm-foundry-style MDS tokens to shards."""

from __future__ import annotations

import gc

import numpy as np
import torch
from streaming import MDSWriter
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd.cli import main
from composer_kd.signal.shards import SignalDataset


def _teacher(folder) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=53, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(folder)
    return model


def _mds_tokens(folder, tokens: np.ndarray) -> None:
    # As llm-foundry's text conversion stores them: one int32 array of token ids per sample.
    with MDSWriter(out=str(folder), columns={'tokens': 'ndarray:int32'}) as writer:
        for row in tokens:
            writer.write({'tokens': row.astype(np.int32)})


def test_the_command_writes_the_teachers_top_k_next_to_mds_tokens(tmp_path, capsys):
    teacher = _teacher(tmp_path / 'teacher')
    tokens = np.random.default_rng(0).integers(0, 53, size=(5, 8))
    _mds_tokens(tmp_path / 'tokens', tokens)
    options = tmp_path / 'signal.yaml'
    options.write_text(f'teacher: {tmp_path / "teacher"}\ntokens: {tmp_path / "tokens"}\nk: 4\n')
    argv = ['teacher-signal', str(options), '--out', str(tmp_path / 'out'), '--student-vocab-size', '53']
    assert main([*argv, '--no-progress']) == 0
    assert 'Teacher signal written to' in capsys.readouterr().out
    dataset = SignalDataset(local=str(tmp_path / 'out'), vocab_size=53)
    with torch.no_grad():
        expected = teacher.eval()(torch.as_tensor(tokens)).logits.topk(4).indices
    for i in range(5):
        assert torch.equal(dataset[i]['teacher_topk_indices'], expected[i])
    del dataset
    gc.collect()
    # Run again: everything is complete, nothing is rewritten.
    assert main([*argv, '--no-progress']) == 0
    assert '0 parts written, 1 already complete' in capsys.readouterr().out


def test_bad_options_exit_with_a_message(tmp_path, capsys):
    _teacher(tmp_path / 'teacher')
    torch.save(torch.randint(0, 53, (3, 6)), tmp_path / 'tokens.pt')
    base = ['teacher-signal', '--teacher', str(tmp_path / 'teacher'), '--tokens', str(tmp_path / 'tokens.pt')]
    base += ['--out', str(tmp_path / 'out'), '--no-progress']
    assert main([*base, '--k', '60']) == 2
    assert 'k=60 must be an integer between 1 and the vocabulary size minus one (52)' in capsys.readouterr().err
    assert main([*base, '--student-vocab-size', '50']) == 2
    assert '53 classes but student_vocab_size=50' in capsys.readouterr().err
    assert main(['teacher-signal', '--out', str(tmp_path / 'x'), '--no-progress']) == 2
    assert '--teacher, --tokens must be given' in capsys.readouterr().err
    assert main([*base[:4], str(tmp_path / 'absent'), *base[5:]]) == 2
    assert 'tokens: no such file or folder' in capsys.readouterr().err
