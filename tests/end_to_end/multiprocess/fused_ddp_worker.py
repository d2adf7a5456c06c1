"""Run by tests/end_to_end/multiprocess/test_fused_multiprocess.py, alone or under Composer's launcher: fused
distillation of a tiny GPT-2 with a global batch of 8 rows split over however many processes there are.

Every row is 10 real tokens with every label known, so each process's loss averages as many tokens and the
processes' mean gradient is the single process's. Rank zero writes the final student weights and the loss terms
of the last step (``results.pt``).
"""

from __future__ import annotations

import argparse
import os

import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from composer.utils import dist
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd import Distillation, Fused, KLDivergence

GLOBAL_BATCH, VOCAB = 8, 48


def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(rows)
    return {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids), 'labels': input_ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    parser.add_argument('--unfused', action='store_true')
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, VOCAB, (24, 10), generator=generator).tolist()
    loader = DataLoader(
        rows,
        batch_size=GLOBAL_BATCH // dist.get_world_size(),
        sampler=dist.get_sampler(rows, shuffle=False),
        collate_fn=collate,
    )
    student = HuggingFaceModel(gpt2(1, 16, seed=2), use_logits=True)
    distillation = Distillation(
        gpt2(2, 24, seed=1), KLDivergence(2.0), 0.5, 0.5, fused=None if args.unfused else Fused(chunk_size=7)
    )
    trainer = Trainer(
        model=student,
        train_dataloader=loader,
        max_duration='3ba',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[distillation],
        device='cpu',
        seed=7,
        progress_bar=False,
    )
    trainer.fit()
    if dist.get_global_rank() == 0:
        weights = {k: v.detach().clone() for k, v in student.model.state_dict().items()}
        torch.save({'world_size': dist.get_world_size(), 'weights': weights}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
