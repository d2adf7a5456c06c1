"""On-policy distillation under FSDP on a CUDA device: version 1 refused when the ``Trainer`` is built, version 2
(one rank) generating and training as without FSDP."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.models import HuggingFaceModel
from tiny_models import tiny_gpt2
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from composer_kd import Distillation, KLDivergence, OnPolicy

pytestmark = pytest.mark.gpu

VOCAB, PAD, PROMPT = 24, 23, 4


def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
    return tiny_gpt2(layers, width, seed, vocab=VOCAB, pad_token_id=PAD)


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(rows)
    return {'input_ids': input_ids, 'labels': input_ids.clone(), 'prompt_length': torch.full((len(rows),), PROMPT)}


def loader() -> DataLoader:
    rows = torch.randint(0, PAD, (16, 10), generator=torch.Generator().manual_seed(0)).tolist()
    return DataLoader(rows, batch_size=8, collate_fn=collate)


def test_fsdp_version_1_is_refused_when_the_trainer_is_built():
    from composer.utils.parallelism import FSDPConfig

    student = HuggingFaceModel(gpt2(1, 16, 1), use_logits=True, shift_labels=True)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=r'does not run under FSDP version 1 .* Use FSDP version 2 .* or DDP\.'):
        Trainer(
            model=student,
            train_dataloader=loader(),
            max_duration='1ba',
            algorithms=[Distillation(gpt2(2, 32, 0), on_policy=OnPolicy(max_new_tokens=4))],
            device='gpu',
            parallelism_config={'fsdp': FSDPConfig(sharding_strategy='FULL_SHARD')},
        )
    assert all(torch.equal(student.state_dict()[k].cpu(), v.cpu()) for k, v in before.items())


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_fsdp_version_2_generates_and_trains_as_without(temperature):
    from composer.utils.parallelism import FSDP2Config
    from torch.distributed.tensor import DTensor

    def run(parallelism_config):
        batches = []

        class Batches(Callback):
            def after_loss(self, state, logger):
                batches.append(state.batch['input_ids'].detach().cpu())

        model = gpt2(1, 16, 1)
        student = HuggingFaceModel(model, use_logits=True, shift_labels=True)
        Trainer(
            model=student,
            train_dataloader=loader(),
            max_duration='2ba',
            optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
            algorithms=[
                Distillation(
                    gpt2(2, 32, 0), KLDivergence(1.0), on_policy=OnPolicy(max_new_tokens=4, temperature=temperature)
                )
            ],
            callbacks=[Batches()],
            device='gpu',
            precision='fp32',
            parallelism_config=parallelism_config,
            progress_bar=False,
            seed=3,
        ).fit()
        weights = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu()
            for k, v in model.state_dict().items()
        }
        return batches, weights

    plain_batches, plain = run(None)
    sharded_batches, sharded = run({'fsdp': FSDP2Config()})
    assert len(plain_batches) == 2 and all(batch.shape == (8, PROMPT + 4) for batch in plain_batches)
    assert all(torch.equal(a, b) for a, b in zip(plain_batches, sharded_batches, strict=True))
    for name, value in plain.items():
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-5, msg=name)
