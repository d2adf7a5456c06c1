"""Run by tests/test_cache_multiprocess.py under Composer's launcher: one student trained three ways per process.

Without a cache, with an in-memory cache and with a disk cache shared by the processes; the sampler reshuffles
every epoch, so each process sees other examples in epoch 2 than the ones it recorded in epoch 1. Rank zero
writes every run's final weights and every process's teacher calls per epoch to ``<output>/results.pt``.
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

from composer_kd import Distillation, IndexedDataset, KLDivergence, TeacherCache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 6, generator=generator), torch.randint(0, 4, (48,), generator=generator))

    results = {}
    for name in ('plain', 'memory', 'disk'):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        student = ComposerClassifier(nn.Linear(6, 4), num_classes=4)
        epochs: list[int] = []
        trainer_state = []
        teacher.register_forward_hook(
            lambda *_, epochs=epochs, trainer_state=trainer_state: epochs.append(int(trainer_state[0].timestamp.epoch))
        )
        cache = {'plain': None, 'memory': TeacherCache(), 'disk': TeacherCache(os.path.join(args.output, 'cache'))}
        dataset = data if name == 'plain' else IndexedDataset(data)
        trainer = Trainer(
            model=student,
            train_dataloader=DataLoader(dataset, batch_size=6, sampler=dist.get_sampler(dataset, shuffle=True)),
            max_duration='2ep',
            optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
            algorithms=[Distillation(teacher, KLDivergence(2.0), 0.5, 0.5, teacher_cache=cache[name])],
            device='cpu',
            seed=0,
            progress_bar=False,
        )
        trainer_state.append(trainer.state)
        trainer.fit()
        results[name] = {
            'weights': {k: v.detach().clone() for k, v in student.state_dict().items()},
            'calls_per_epoch': dist.all_gather_object([epochs.count(e) for e in range(2)]),
            'recorded': cache[name].n_recorded if cache[name] is not None else None,
        }
    if dist.get_global_rank() == 0:
        torch.save({'world_size': dist.get_world_size(), **results}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
