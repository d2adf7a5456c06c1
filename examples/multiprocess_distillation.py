"""Distillation on several processes with Composer's own launcher.

Each process (rank) holds its own frozen teacher replica and trains the DDP-wrapped student on its shard of
every global batch; DDP averages the student's gradients, so the run matches a single process that sees the
whole global batch. On CPU the processes talk over gloo; on GPUs, over NCCL, one process per GPU.

Run it with::

    composer -n 2 examples/multiprocess_distillation.py --output-dir runs/ddp    # two processes
    python examples/multiprocess_distillation.py --output-dir runs/single         # one process, same result

The final student weights are written to ``<output-dir>/student.pt`` by rank zero.
"""

from __future__ import annotations

import argparse
import os

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, KLDivergence

N_FEATURES, N_CLASSES = 16, 4


def make_data(n: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=generator)
    y = (x[:, :N_CLASSES] * 2).argmax(dim=1)  # a learnable rule
    return TensorDataset(x, y)


def build_models(seed: int = 0) -> tuple[nn.Module, ComposerClassifier]:
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(N_FEATURES, 64), nn.ReLU(), nn.Linear(64, N_CLASSES))
    student = ComposerClassifier(nn.Linear(N_FEATURES, N_CLASSES), num_classes=N_CLASSES)
    return teacher, student


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output-dir', required=True, help='where rank zero writes student.pt')
    parser.add_argument('--global-batch-size', type=int, default=32)
    parser.add_argument('--samples', type=int, default=256)
    parser.add_argument('--epochs', type=int, default=2)
    args = parser.parse_args(argv)

    world_size = dist.get_world_size()
    if args.global_batch_size % world_size:
        parser.error(f'--global-batch-size {args.global_batch_size} must divide among {world_size} processes')
    dataset = make_data(args.samples)
    # Each rank reads its own shard, in the same order every run (no shuffling), so runs are comparable.
    sampler = dist.get_sampler(dataset, shuffle=False, drop_last=True)
    dataloader = DataLoader(dataset, batch_size=args.global_batch_size // world_size, sampler=sampler)

    teacher, student = build_models()
    trainer = Trainer(
        model=student,
        train_dataloader=dataloader,
        max_duration=f'{args.epochs}ep',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[Distillation(teacher, KLDivergence(temperature=2.0), org_loss_weight=0.5, kd_loss_weight=0.5)],
        device='cpu',
        seed=0,
        progress_bar=False,
    )
    trainer.fit()
    weights = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    if dist.get_global_rank() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        torch.save({'weights': weights, 'world_size': world_size}, os.path.join(args.output_dir, 'student.pt'))
        print(f'world size {world_size}: rank 0 last-batch loss {float(trainer.state.loss["total"]):.6f}')
    return {'weights': weights, 'world_size': world_size}


if __name__ == '__main__':
    main()
