"""Run by tests/end_to_end/multiprocess/test_features_multiprocess.py, alone or under Composer's launcher: feature
distillation with a learned projection, the student seeing a global batch of 16 split over however many processes
there are.

Three cases: the projection used at every step; the distillation window closing after the first batch (``end=``);
two teachers sampled one per step, so that the pair's teacher (and its projection) is skipped on some steps. Rank
zero writes each case's final student weights and projections to ``<output>/results.pt``. With ``--fsdp`` the
student is sharded by Composer's FSDP (version 2, which runs on a CPU with gloo) rather than replicated by DDP.
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict

import torch
import torch.distributed
from composer import Trainer
from composer.models import ComposerClassifier
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset
from worker_exit import leave_process_group

from composer_kd import Distillation, FeaturePair

GLOBAL_BATCH = 16
CASES = {
    'every_step': {},
    'window_closed': {'end': '1ba'},
    'teacher_skipped': {'n_teachers_to_sample': 1},
}


def net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(hidden=nn.Linear(16, width), act=nn.ReLU(), out=nn.Linear(width, 4)))


def average_in_gloo_reduce_scatter() -> None:
    """Make gloo's reduce-scatter average when asked to, as NCCL's does.

    FSDP2 averages the student's gradients with ``reduce_scatter_tensor(op=ReduceOp.AVG)``, and gloo (torch 2.7)
    silently sums instead; without this a 2-process FSDP run on a CPU trains the student on twice its gradient.
    """
    reduce_scatter = torch.distributed.reduce_scatter_tensor

    def averaging_reduce_scatter(output, input, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if op != torch.distributed.ReduceOp.AVG:
            return reduce_scatter(output, input, op=op, group=group, async_op=async_op)
        assert not async_op
        reduce_scatter(output, input, op=torch.distributed.ReduceOp.SUM, group=group)
        output.div_(torch.distributed.get_world_size(group))

    torch.distributed.reduce_scatter_tensor = averaging_reduce_scatter


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor, gathered from every process where FSDP sharded it."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def run_case(name: str, fsdp: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 16, generator=generator), torch.randint(0, 4, (64,), generator=generator))
    loader = DataLoader(
        data, batch_size=GLOBAL_BATCH // dist.get_world_size(), sampler=dist.get_sampler(data, shuffle=False)
    )
    teachers = [net(32, seed=1), net(24, seed=2)]
    student = ComposerClassifier(net(8, seed=3), num_classes=4)
    distillation = Distillation(
        teachers,
        feature_pairs=[FeaturePair(student='hidden', teacher='hidden', loss='mse', weight=0.5)],
        **CASES[name],
    )
    trainer = Trainer(
        model=student,
        train_dataloader=loader,
        max_duration='4ba',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5, momentum=0.9),
        algorithms=[distillation],
        device='cpu',
        seed=7,
        progress_bar=False,
        parallelism_config={'fsdp': FSDP2Config()} if fsdp else None,
    )
    trainer.fit()
    weights = {f'student.{k}': whole(v) for k, v in student.state_dict().items()}
    projections = distillation.projections.state_dict()
    # Under FSDP as under DDP every process holds the whole projections (kept out of sharding, averaged by hand).
    assert not any(isinstance(v, DTensor) for v in projections.values())
    weights.update({f'projection.{k}': whole(v) for k, v in projections.items()})
    return weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    parser.add_argument('--fsdp', action='store_true')
    args = parser.parse_args()
    if args.fsdp:
        average_in_gloo_reduce_scatter()
    results = {name: run_case(name, args.fsdp) for name in CASES}
    if dist.get_global_rank() == 0:
        torch.save({'world_size': dist.get_world_size(), **results}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
    leave_process_group()
