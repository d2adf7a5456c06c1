"""Writes the training checkpoints that ``test_legacy_checkpoints.py`` resumes, and what resuming them must give.

They were written once, by the package as it was before its modules were reorganized, and are kept as they are:
a checkpoint a user wrote with an earlier version must keep resuming. Run from the repository root to write them
again (only when their format is meant to change)::

    python tests/data/legacy/make_checkpoints.py
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, FeaturePair, IndexedDataset, LinearSchedule, TeacherCache

HERE = os.path.dirname(os.path.abspath(__file__))
N_FEATURES, N_CLASSES = 6, 4


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = OrderedDict(hidden=nn.Linear(N_FEATURES, width), act=nn.ReLU(), out=nn.Linear(width, N_CLASSES))
    return nn.Sequential(layers)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(32, N_FEATURES, generator=generator)
    return TensorDataset(inputs, torch.randint(0, N_CLASSES, (32,), generator=generator))


def features_setup(teachers: list[nn.Module]) -> tuple[Distillation, DataLoader]:
    """Two sampled teachers, scheduled weight and temperature, and a feature pair with a learned projection."""
    distillation = Distillation(
        teachers,
        n_teachers_to_sample=1,
        temperature=LinearSchedule(4.0, 2.0),
        kd_loss_weight=LinearSchedule(1.0, 0.5),
        feature_pairs=[FeaturePair(student='hidden', teacher='hidden', loss='mse', weight=0.5)],
    )
    return distillation, DataLoader(dataset(), batch_size=8, shuffle=False)


def cache_setup(teachers: list[nn.Module]) -> tuple[Distillation, DataLoader]:
    """An in-memory teacher cache, which rides in the checkpoint."""
    distillation = Distillation(teachers[0], teacher_cache=TeacherCache())
    return distillation, DataLoader(IndexedDataset(dataset()), batch_size=8, shuffle=False)


SETUPS = {'features': features_setup, 'cache': cache_setup}


def trainer(setup: str, teachers: list[nn.Module], folder: str, load_path: str | None = None) -> Trainer:
    distillation, loader = SETUPS[setup](teachers)
    return Trainer(
        model=ComposerClassifier(mlp(8, seed=100), num_classes=N_CLASSES),
        train_dataloader=loader,
        max_duration='2ep',
        algorithms=[distillation],
        optimizers=None,
        save_folder=folder,
        save_filename='ep{epoch}.pt',
        save_interval='1ep',
        load_path=load_path,
        progress_bar=False,
        device='cpu',
        seed=11,
        deterministic_mode=True,
    )


def student_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The student's weights after the fit, and the feature projections as the checkpoint held them."""
    state = {f'model.{k}': v.detach().clone() for k, v in trainer.state.model.state_dict().items()}
    distillation = trainer.state.algorithms[0]
    for key, value in distillation.projections.state_dict().items():
        state[f'projections.{key}'] = value.detach().clone()
    return state


def main() -> None:
    import tempfile

    for setup in SETUPS:
        teachers = [mlp(16, seed=1), mlp(12, seed=2)]
        with tempfile.TemporaryDirectory() as folder:
            run = trainer(setup, teachers, folder)
            run.fit()
            run.close()
            torch.save(
                {'teachers': [t.state_dict() for t in teachers], 'final': student_state(run)},
                os.path.join(HERE, f'{setup}_expected.pt'),
            )
            os.replace(os.path.join(folder, 'ep1.pt'), os.path.join(HERE, f'{setup}_ep1.pt'))
    print('written to', HERE, file=sys.stderr)


if __name__ == '__main__':
    main()
