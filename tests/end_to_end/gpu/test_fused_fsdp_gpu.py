"""CUDA only: ``Distillation(fused=True)`` under Composer's FSDP version 1 (which needs CUDA), on one GPU.

A student sharded by FSDP version 1 is refused when the fit starts, before any weight changes, with an error
naming where its output layer sits and the alternatives: an output layer wrapped as its own FSDP unit
(``lm_head._fsdp_wrap = True``, as llm-foundry's untied MPT marks it), and one in the root unit (Composer's
default wrapping of a Hugging Face model), which version 1 gives outside the forward pass only as flattened shards
or, on one process, as views whose gradient it cannot write back. (FSDP version 2, which runs on a CPU, is tested
on two processes in tests/end_to_end/multiprocess/test_fused_multiprocess.py.)
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import pytest
import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from composer.utils import dist
from tiny_models import tiny_gpt2
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from composer_kd import Distillation, Fused, KLDivergence

pytestmark = pytest.mark.gpu

VOCAB = 48
FSDP_V1 = {'fsdp': {'sharding_strategy': 'FULL_SHARD'}}
REFUSED = r'output layer \(model\.lm_head\) is wrapped as its own FSDP unit under FSDP version 1'
ROOT_REFUSED = r'output layer \(model\.lm_head\) is in the root unit of FSDP version 1'


def gpt2(layers: int, width: int, seed: int, tied: bool = True) -> GPT2LMHeadModel:
    return tiny_gpt2(layers, width, seed, vocab=VOCAB, tie_word_embeddings=tied)


def loader() -> DataLoader:
    ids = torch.randint(0, VOCAB, (24, 10), generator=torch.Generator().manual_seed(0))
    rows = [{'input_ids': row, 'attention_mask': torch.ones_like(row), 'labels': row.clone()} for row in ids]
    return DataLoader(rows, batch_size=8 // dist.get_world_size(), sampler=dist.get_sampler(rows, shuffle=False))


def fit(student: Any, teacher: torch.nn.Module, parallelism_config: Optional[dict]) -> Trainer:
    trainer = Trainer(
        model=student,
        train_dataloader=loader(),
        max_duration='3ba',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[Distillation(teacher, KLDivergence(2.0), 0.5, 0.5, fused=Fused(chunk_size=7))],
        device='gpu',
        precision='fp32',
        parallelism_config=parallelism_config,
        seed=7,
        progress_bar=False,
    )
    trainer.fit()
    return trainer


def assert_initial_weights(student: HuggingFaceModel, before: dict[str, torch.Tensor]) -> None:
    """The student, wrapped by FSDP by now, holds the weights it was built with (its full state dict)."""
    after = {k.replace('_fsdp_wrapped_module.', ''): v for k, v in student.model.state_dict().items()}
    common = before.keys() & after.keys()
    assert len(common) >= len(before) - 1  # a tied weight may be given once
    for key in common:
        torch.testing.assert_close(after[key].detach().float().cpu(), before[key].float(), rtol=0, atol=0, msg=key)


@pytest.mark.parametrize('sharding_strategy', ['FULL_SHARD', 'SHARD_GRAD_OP'])
def test_fsdp_v1_with_the_output_layer_in_the_root_unit_is_refused_when_the_trainer_is_built(sharding_strategy):
    network = gpt2(1, 16, seed=2)
    before = {k: v.detach().clone() for k, v in network.state_dict().items()}
    student = HuggingFaceModel(network, use_logits=True)
    with pytest.raises(ValueError, match=ROOT_REFUSED) as refused:
        fit(student, gpt2(2, 24, seed=1), {'fsdp': {'sharding_strategy': sharding_strategy}})
    assert 'Use FSDP version 2' in str(refused.value) and 'or DDP' in str(refused.value)
    assert_initial_weights(student, before)


def test_fsdp_v1_with_the_output_layer_in_its_own_unit_is_refused_when_the_trainer_is_built():
    network = gpt2(1, 16, seed=2, tied=False)
    network.lm_head._fsdp_wrap = True
    before = {k: v.detach().clone() for k, v in network.state_dict().items()}
    student = HuggingFaceModel(network, use_logits=True)
    with pytest.raises(ValueError, match=REFUSED) as refused:
        fit(student, gpt2(2, 24, seed=1), FSDP_V1)
    assert 'Use FSDP version 2' in str(refused.value) and 'or DDP' in str(refused.value)
    assert_initial_weights(student, before)


@pytest.mark.skipif(importlib.util.find_spec('llmfoundry') is None, reason='llm-foundry is not installed')
def test_fsdp_v1_refuses_llm_foundry_untied_mpt_whose_lm_head_is_its_own_unit():
    from llmfoundry.models.mpt import ComposerMPTCausalLM

    torch.manual_seed(2)
    student = ComposerMPTCausalLM(
        d_model=16,
        n_heads=2,
        n_layers=1,
        max_seq_len=32,
        vocab_size=VOCAB,
        expansion_ratio=2,
        attn_config={'attn_impl': 'torch'},
        tie_word_embeddings=False,
        loss_fn='torch_crossentropy',
    )
    with pytest.raises(ValueError, match=REFUSED):
        fit(student, gpt2(2, 24, seed=1), FSDP_V1)
