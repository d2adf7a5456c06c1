"""Shared fixtures: tiny models and data that make a Composer fit take a fraction of a second."""

from __future__ import annotations

import os

import pytest
import torch
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Two CPU threads are all CI has; more only adds contention between test workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))

N_FEATURES, N_CLASSES = 6, 4


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_deterministic_algorithms():
    """Composer's ``deterministic_mode`` switches PyTorch's deterministic algorithms on for the whole process;
    switch them back so that a test needing an operation without a deterministic kernel still runs after it."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def make_teacher(seed: int = 0, n_classes: int = N_CLASSES, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(N_FEATURES, 16),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(16, n_classes),
    )


def make_student(seed: int = 100) -> ComposerClassifier:
    torch.manual_seed(seed)
    return ComposerClassifier(nn.Linear(N_FEATURES, N_CLASSES), num_classes=N_CLASSES)


def make_dataloader(n: int = 32, batch_size: int = 8, seed: int = 7) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=generator)
    y = torch.randint(0, N_CLASSES, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.fixture
def dataloader() -> DataLoader:
    return make_dataloader()
