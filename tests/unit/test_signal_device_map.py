"""A teacher dispatched with a device map (Accelerate, part of it offloaded to disk) writes the signal the same
teacher writes whole, byte for byte and with the same fingerprint, and is left where its map put it."""

from __future__ import annotations

import copy
import os
import warnings

import torch
from accelerate import dispatch_model
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd.signal.writer import write_teacher_signal


def _files(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(folder, name), root): open(os.path.join(folder, name), 'rb').read()
        for folder, _, names in os.walk(root)
        for name in names
    }


def test_a_device_mapped_teacher_writes_the_signal_the_whole_teacher_writes(tmp_path):
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    tokens = torch.randint(0, 64, (6, 8), generator=torch.Generator().manual_seed(1))
    options = dict(k=4, batch_size=2, sequences_per_part=4, progress=False, kept_mass_warning=0.0)
    write_teacher_signal(teacher, tokens, str(tmp_path / 'whole'), **options)

    device_map = {
        'transformer.wte': 'cpu', 'transformer.wpe': 'cpu', 'transformer.drop': 'cpu', 'transformer.h': 'disk',
        'transformer.ln_f': 'cpu', 'lm_head': 'cpu',
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Accelerate says that offloaded weights are on the meta device
        mapped = dispatch_model(copy.deepcopy(teacher), device_map=device_map, offload_dir=str(tmp_path / 'offload'))
    offloaded = {name for name, p in mapped.named_parameters() if p.is_meta}
    assert offloaded and all(name.startswith('transformer.h.') for name in offloaded)
    write_teacher_signal(mapped, tokens, str(tmp_path / 'mapped'), **options)

    whole, from_map = _files(tmp_path / 'whole'), _files(tmp_path / 'mapped')
    assert sorted(whole) == sorted(from_map)
    for name, content in whole.items():
        assert from_map[name] == content, name  # teacher_signal.json included: the same fingerprint
    assert {name for name, p in mapped.named_parameters() if p.is_meta} == offloaded  # not moved
