"""Run by tests/end_to_end/multiprocess/test_onpolicy_multiprocess.py, alone or under Composer's launcher: on-policy
distillation of a tiny GPT-2 with a global batch of 8 prompts split over however many processes there are.

The student is trained twice, generating greedily and then sampling at temperature 1: neither kind of continuation
depends on how the prompts are split (a sampled one is seeded by the seed, the step and its prompt). Every row has a
prompt of 4 tokens and 4 generated ones, so each process's loss averages as many tokens and the processes' mean
gradient is the single process's. Each rank writes the prompts it generated for (``rank<i>.pt``); rank zero also
writes the final student weights (``results.pt``). With several processes the worker then builds the same trainer
with the student sharded by Composer's FSDP (version 2, which runs on a CPU with gloo) and keeps the error its fit
raises.
"""

from __future__ import annotations

import argparse
import os

import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd import Distillation, KLDivergence, OnPolicy

GLOBAL_BATCH, VOCAB, PAD, PROMPT = 8, 24, 23, 4


def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        pad_token_id=PAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(rows)
    return {
        'input_ids': input_ids,
        'attention_mask': torch.ones_like(input_ids),
        'labels': input_ids.clone(),
        'prompt_length': torch.full((len(rows),), PROMPT),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, PAD, (32, 10), generator=generator).tolist()
    loader = DataLoader(
        rows,
        batch_size=GLOBAL_BATCH // dist.get_world_size(),
        sampler=dist.get_sampler(rows, shuffle=False),
        collate_fn=collate,
    )
    prompts: list[list[int]] = []
    weights = distil(loader, temperature=0.0, prompts=prompts)
    rank = dist.get_global_rank()
    torch.save({'prompts': prompts}, os.path.join(args.output, f'rank{rank}.pt'))
    # Sampled continuations depend on the seed, the step and each prompt, not on the rank they are generated on.
    sampled = distil(loader, temperature=1.0, prompts=[])
    fsdp_error = under_fsdp(loader) if dist.get_world_size() > 1 else None
    if rank == 0:
        results = {'world_size': dist.get_world_size(), 'weights': weights, 'sampled_weights': sampled}
        results['fsdp_error'] = fsdp_error
        torch.save(results, os.path.join(args.output, 'results.pt'))


def on_policy_trainer(loader: DataLoader, temperature: float, duration: str, **trainer_options) -> Trainer:
    """A trainer distilling the tiny GPT-2 student on-policy, generating at ``temperature``."""
    student = HuggingFaceModel(gpt2(1, 16, seed=2), use_logits=True, shift_labels=True)
    distillation = Distillation(
        gpt2(2, 32, seed=1),
        KLDivergence(1.0),
        on_policy=OnPolicy(fraction=1.0, max_new_tokens=4, temperature=temperature),
    )
    return Trainer(
        model=student,
        train_dataloader=loader,
        max_duration=duration,
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[distillation],
        device='cpu',
        seed=7,
        progress_bar=False,
        **trainer_options,
    )


def distil(loader: DataLoader, temperature: float, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """The student's weights after 3 on-policy batches, generating at ``temperature``; ``prompts`` records its own."""
    trainer = on_policy_trainer(loader, temperature, '3ba')
    student = trainer.state.model.module if hasattr(trainer.state.model, 'module') else trainer.state.model
    original = student.model.generate

    def generate(*positional, **kwargs):
        prompts.extend(kwargs['input_ids'].tolist())
        return original(*positional, **kwargs)

    student.model.generate = generate
    trainer.fit()
    trainer.close()
    return {k: v.detach().clone() for k, v in student.model.state_dict().items()}


def under_fsdp(loader: DataLoader) -> dict[str, object]:
    """The error (type, message) of an on-policy fit whose student FSDP shards, and whether any step ran."""
    trainer = on_policy_trainer(loader, 0.0, '1ba', parallelism_config={'fsdp': FSDP2Config()})
    try:
        trainer.fit()
    except ValueError as error:
        return {'type': type(error).__name__, 'message': str(error), 'batches': int(trainer.state.timestamp.batch)}
    finally:
        trainer.close()
    return {'type': None, 'message': '', 'batches': int(trainer.state.timestamp.batch)}


if __name__ == '__main__':
    main()
