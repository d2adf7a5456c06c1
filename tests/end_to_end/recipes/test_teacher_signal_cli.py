"""``composer-kd teacher-signal``: from a saved Hugging Face teacher and llm-foundry-style MDS tokens to shards."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
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


# --- a teacher loads exactly as it was saved, or is refused --------------------------------------------------------


def _files(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(scope='module')
def foundry_teacher(tmp_path_factory):
    """llm-foundry's MPT saved as its hf_checkpointer saves it: weights, config.json with an auto_map, and the model's
    code with its imports flattened into the folder."""
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM
    from llmfoundry.utils.huggingface_hub_utils import edit_files_for_hf_compatibility

    folder = tmp_path_factory.mktemp('foundry') / 'mpt_teacher'
    torch.manual_seed(0)
    # expansion_ratio 4 is the one transformers' own MPT assumes: it builds from this config without a shape error.
    config = MPTConfig(
        d_model=16, n_heads=2, n_layers=1, expansion_ratio=4, max_seq_len=16, vocab_size=53,
        attn_config={'attn_impl': 'torch'}, init_device='cpu',
    )  # fmt: skip
    model = MPTForCausalLM(config).eval()
    saved = (MPTConfig._auto_class, MPTForCausalLM._auto_class)
    MPTConfig.register_for_auto_class()
    MPTForCausalLM.register_for_auto_class('AutoModelForCausalLM')
    try:
        model.save_pretrained(folder)
    finally:
        MPTConfig._auto_class, MPTForCausalLM._auto_class = saved
    edit_files_for_hf_compatibility(str(folder))
    return folder, model


def test_a_folder_that_ships_its_own_model_code_is_refused_without_trusting_it(tmp_path, capsys, foundry_teacher):
    folder, _ = foundry_teacher
    before = _files(folder)
    torch.save(torch.randint(0, 53, (3, 8)), tmp_path / 'tokens.pt')
    argv = ['teacher-signal', '--teacher', str(folder), '--tokens', str(tmp_path / 'tokens.pt')]
    assert main([*argv, '--out', str(tmp_path / 'out'), '--k', '4', '--no-progress']) == 2
    error = capsys.readouterr().err
    assert 'ships the code of its own model' in error and 'modeling_mpt.py' in error
    assert '--trust-remote-code' in error
    assert not (tmp_path / 'out').exists()
    assert _files(folder) == before


def test_trusted_the_folders_own_code_gives_the_llm_foundry_teachers_signal(tmp_path, foundry_teacher):
    folder, model = foundry_teacher
    tokens = torch.randint(0, 53, (3, 8), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / 'tokens.pt')
    argv = ['teacher-signal', '--teacher', str(folder), '--tokens', str(tmp_path / 'tokens.pt'), '--k', '4']
    assert main([*argv, '--out', str(tmp_path / 'out'), '--trust-remote-code', '--no-progress']) == 0
    dataset = SignalDataset(local=str(tmp_path / 'out'), vocab_size=53)
    with torch.no_grad():
        expected = model(tokens).logits
    for i in range(3):
        assert torch.equal(dataset[i]['teacher_topk_indices'], expected[i].topk(4).indices)
        torch.testing.assert_close(
            dataset[i]['teacher_topk_logits'], expected[i].topk(4).values, rtol=0, atol=2e-3
        )  # stored in float16
    del dataset
    gc.collect()


def test_weights_a_model_leaves_unused_or_lacks_are_named(tmp_path, capsys, foundry_teacher):
    # The same MPT folder without its code: transformers' own MPT builds from it and uses 8 of its 16 tensors less.
    folder, _ = foundry_teacher
    stripped = tmp_path / 'stripped'
    stripped.mkdir()
    for name, data in _files(folder).items():
        if name == 'config.json':
            config = json.loads(data)
            del config['auto_map']
            data = json.dumps(config).encode()
        if not name.endswith('.py'):
            (stripped / name).write_bytes(data)
    torch.save(torch.randint(0, 53, (3, 8)), tmp_path / 'tokens.pt')
    base = ['teacher-signal', '--tokens', str(tmp_path / 'tokens.pt'), '--out', str(tmp_path / 'out'), '--k', '4']
    assert main([*base, '--teacher', str(stripped), '--no-progress']) == 2
    error = capsys.readouterr().err
    assert '8 weights in the folder that the model leaves unused' in error
    assert 'transformer.wpe.weight' in error and 'transformer.blocks.0.attn.Wqkv.bias' in error
    # A GPT-2 folder lacking one tensor of its model.
    _teacher(tmp_path / 'gpt2')
    weights = load_file(tmp_path / 'gpt2' / 'model.safetensors')
    del weights['transformer.h.0.attn.c_attn.bias']
    save_file(weights, tmp_path / 'gpt2' / 'model.safetensors', metadata={'format': 'pt'})
    assert main([*base, '--teacher', str(tmp_path / 'gpt2'), '--no-progress']) == 2
    assert '1 weights of the model that the folder lacks' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
