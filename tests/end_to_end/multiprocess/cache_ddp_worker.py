"""Run by tests/end_to_end/multiprocess/test_cache_multiprocess.py under Composer's launcher: one student trained
several ways per process, with the processes sharing a teacher cache.

Uninterrupted: without a cache, with an in-memory cache and with a disk cache shared by the processes; the sampler
reshuffles every epoch, so each process sees other examples in epoch 2 than the ones it recorded in epoch 1.
Interrupted and resumed from a checkpoint: an in-memory cache saved at the end of epoch 1, a disk cache saved in
the middle of epoch 1, and an in-memory cache saved in the middle of epoch 1 (which holds only rank zero's rows of
that epoch). The processes share their rows by all_gathers of at most ``CHUNK_BYTES`` (lowered from 64 MiB so that
an exchange takes several); every all_gather the in-memory run's exchange makes is recorded.

Rank zero writes to ``<output>/results.pt`` every run's final weights, every process's teacher calls per epoch,
and, for the uninterrupted in-memory run, every process's table and the all_gathers of its exchange.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from worker_exit import leave_process_group

from composer_kd import Distillation, IndexedDataset, KLDivergence, TeacherCache
from composer_kd.cache import storage

#: One example's row is 4 float32 logits (16 bytes): a chunk holds 5 rows, so 24 rows take 5 all_gathers.
CHUNK_BYTES = 80


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(48, 6, generator=generator), torch.randint(0, 4, (48,), generator=generator))


def make_teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


class RecordingDist:
    """``composer.utils.dist`` as the cache's storage module sees it, recording the tensors it all-gathers."""

    def __init__(self):
        self.gathered: list[dict[str, Any]] = []

    def all_gather(self, tensor: torch.Tensor, group=None):
        self.gathered.append({'dtype': str(tensor.dtype), 'shape': tuple(tensor.shape), 'bytes': tensor.nbytes})
        return dist.all_gather(tensor, group=group)

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)


def train(
    cache: Optional[TeacherCache],
    max_duration: str,
    folder: Optional[str] = None,
    save_interval: Optional[str] = None,
    load_path: Optional[str] = None,
) -> dict[str, Any]:
    """One fit of 2 epochs' worth of data (4 batches of 6 per process and epoch); its weights and teacher calls."""
    teacher = make_teacher()
    student = ComposerClassifier(nn.Linear(6, 4), num_classes=4)
    epochs: list[int] = []
    trainer_state = []
    teacher.register_forward_hook(
        lambda *_, epochs=epochs, trainer_state=trainer_state: epochs.append(int(trainer_state[0].timestamp.epoch))
    )
    dataset = make_data() if cache is None else IndexedDataset(make_data())
    checkpoints: dict[str, Any] = {}
    if folder is not None:
        checkpoints = {'save_folder': folder, 'save_filename': 'ba{batch}.pt', 'save_interval': save_interval}
    trainer = Trainer(
        model=student,
        train_dataloader=DataLoader(dataset, batch_size=6, sampler=dist.get_sampler(dataset, shuffle=True)),
        max_duration=max_duration,
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[Distillation(teacher, KLDivergence(2.0), 0.5, 0.5, teacher_cache=cache)],
        device='cpu',
        seed=0,
        progress_bar=False,
        load_path=load_path,
        **checkpoints,
    )
    trainer_state.append(trainer.state)
    trainer.fit()
    trainer.close()
    return {
        'weights': {k: v.detach().clone() for k, v in student.state_dict().items()},
        'calls_per_epoch': dist.all_gather_object([epochs.count(e) for e in range(2)]),
        'recorded': cache.n_recorded if cache is not None else None,
    }


def resumed(name: str, output: str, make_cache, stop: str, batch: int) -> dict[str, Any]:
    """A run stopped after ``stop`` (batch ``batch``) with a checkpoint there, then resumed from it to 2 epochs by a
    new trainer."""
    folder = os.path.join(output, f'checkpoints-{name}')
    train(make_cache(), stop, folder=folder, save_interval=stop)
    return train(make_cache(), '2ep', load_path=os.path.join(folder, f'ba{batch}.pt'))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    args = parser.parse_args()
    storage._EXCHANGE_CHUNK_BYTES = CHUNK_BYTES

    results: dict[str, Any] = {'plain': train(None, '2ep')}

    recording = RecordingDist()
    storage.dist = recording
    try:
        memory = TeacherCache()
        results['memory'] = train(memory, '2ep')
    finally:
        storage.dist = dist
    results['memory']['gathered'] = recording.gathered
    results['memory']['tables'] = dist.all_gather_object(
        {'values': memory._table.arrays['values'].clone(), 'filled': memory._table.filled.clone()}
    )

    results['disk'] = train(TeacherCache(os.path.join(args.output, 'cache')), '2ep')
    # Resumed from the checkpoint written at the end of epoch 1 (batch 4): the cache in it holds every row.
    results['memory_epoch_end'] = resumed('memory_epoch_end', args.output, TeacherCache, '1ep', 4)
    # A folder cache resumed in the middle of epoch 1 (batch 2): each process's rows are in the shared files.
    folder = os.path.join(args.output, 'cache-resumed')
    results['disk_mid_epoch'] = resumed('disk_mid_epoch', args.output, lambda: TeacherCache(folder), '2ba', 2)
    # An in-memory cache saved in the middle of epoch 1 holds only rank zero's rows of that epoch.
    results['memory_mid_epoch'] = resumed('memory_mid_epoch', args.output, TeacherCache, '2ba', 2)
    if dist.get_global_rank() == 0:
        torch.save({'world_size': dist.get_world_size(), **results}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
    leave_process_group()
