"""The fused output layer and FSDP version 1, in one process: refused when the ``Trainer`` is built (before
Composer wraps the student, which on a CPU it could not), naming the unit the output layer would be in, with nothing
of the student or teacher changed. Version 2: tests/end_to_end/multiprocess/test_fused_multiprocess.py."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd import Distillation, Fused

VOCAB = 32


def gpt2(layers: int, width: int, seed: int, tied: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=width, n_layer=layers, n_head=2)
    config.tie_word_embeddings = tied
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize('own_unit', [False, True])
def test_fsdp_version_1_is_refused_when_the_trainer_is_built(own_unit):
    network = gpt2(1, 16, seed=2, tied=not own_unit)
    if own_unit:
        network.lm_head._fsdp_wrap = True
    student, teacher = HuggingFaceModel(network, use_logits=True), gpt2(2, 24, seed=1)
    before = {k: v.clone() for k, v in [*student.state_dict().items(), *teacher.state_dict().items()]}
    ids = torch.randint(0, VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))
    rows = [{'input_ids': row, 'attention_mask': torch.ones_like(row), 'labels': row.clone()} for row in ids]
    layout = 'is wrapped as its own FSDP unit under FSDP version 1' if own_unit else 'is in the root unit of FSDP'
    with pytest.raises(ValueError, match=rf"The student's output layer \(lm_head\) {layout}.*Use FSDP version 2"):
        Trainer(
            model=student,
            train_dataloader=DataLoader(rows, batch_size=4),
            max_duration='1ba',
            algorithms=[Distillation(teacher, 'kl', fused=Fused())],
            device='cpu',
            parallelism_config={'fsdp': {'sharding_strategy': 'FULL_SHARD'}},
        )
    after = dict([*student.state_dict().items(), *teacher.state_dict().items()])
    assert all(torch.equal(after[k], v) for k, v in before.items())
