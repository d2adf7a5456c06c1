"""Run by tests/test_features_multiprocess.py, alone or under Composer's launcher: feature distillation with a
learned projection, the student seeing a global batch of 16 split over however many processes there are.

Three cases: the projection used at every step; the distillation window closing after the first batch (``end=``);
two teachers sampled one per step, so that the pair's teacher (and its projection) is skipped on some steps. Rank
zero writes each case's final student weights and projections to ``<output>/results.pt``.
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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


def run_case(name: str) -> dict[str, torch.Tensor]:
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
    )
    trainer.fit()
    weights = {f'student.{k}': v.detach().clone() for k, v in student.state_dict().items()}
    weights.update({f'projection.{k}': v.detach().clone() for k, v in distillation.projections.state_dict().items()})
    return weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    args = parser.parse_args()
    results = {name: run_case(name) for name in CASES}
    if dist.get_global_rank() == 0:
        torch.save({'world_size': dist.get_world_size(), **results}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
