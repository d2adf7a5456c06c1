"""On-policy distillation and FSDP in one process: FSDP version 1 refused when the ``Trainer`` is built, before
anything changes; the gathering for generation does nothing to a model FSDP has not sharded. Version 2 trains on two
processes in tests/end_to_end/multiprocess/test_onpolicy_multiprocess.py."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd import Distillation, OnPolicy
from composer_kd.parts.onpolicy import gathered_for_generation

VOCAB, PAD, PROMPT = 24, 23, 4


def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=width, n_layer=layers, n_head=2, pad_token_id=PAD)
    return GPT2LMHeadModel(config)


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(rows)
    return {'input_ids': input_ids, 'labels': input_ids.clone(), 'prompt_length': torch.full((len(rows),), PROMPT)}


@pytest.mark.parametrize('source', ['student', 'teacher'])
def test_fsdp_version_1_is_refused_when_the_trainer_is_built(source):
    student, teacher = HuggingFaceModel(gpt2(1, 16, 1), use_logits=True, shift_labels=True), gpt2(2, 32, 0)
    before = {k: v.clone() for k, v in [*student.state_dict().items(), *teacher.state_dict().items()]}
    rows = torch.randint(0, PAD, (8, 10), generator=torch.Generator().manual_seed(0)).tolist()
    message = r'does not run under FSDP version 1 .* Use FSDP version 2 .*FSDP2Config\(\).* or DDP\.'
    with pytest.raises(ValueError, match=message):
        Trainer(
            model=student,
            train_dataloader=DataLoader(rows, batch_size=4, collate_fn=collate),
            max_duration='1ba',
            algorithms=[Distillation(teacher, on_policy=OnPolicy(source=source, max_new_tokens=4))],
            device='cpu',
            # The refusal comes at Event.INIT, before Composer wraps the model (which on a CPU it could not).
            parallelism_config={'fsdp': {'sharding_strategy': 'FULL_SHARD'}},
        )
    after = dict([*student.state_dict().items(), *teacher.state_dict().items()])
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_gathering_a_model_that_is_not_sharded_changes_nothing():
    model = gpt2(1, 16, 1).train()
    parameters = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    with gathered_for_generation(model) as gathered:
        assert gathered is model and model.training
        assert all(p is model.get_parameter(name) for name, (p, _) in parameters.items())
    assert all(torch.equal(p, copy) and p is model.get_parameter(n) for n, (p, copy) in parameters.items())
