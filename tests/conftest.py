"""What the tests share: tiny models and data that make a Composer fit take a fraction of a second, one way to
fit, one recording callback, a callback that preempts a run, the one-thread fixture, the repository's paths and the
multi-process launcher.

The suite is grouped by layer, each a folder: ``unit`` (pure functions and objects, no Trainer),
``end_to_end/fit`` (``Distillation`` and the other algorithms inside a Composer ``Trainer``),
``end_to_end/recipes`` (recipes, the command, the demo, ``distill()``), ``end_to_end/multiprocess`` (several
processes under Composer's launcher), ``end_to_end/gpu`` (CUDA only, marked ``gpu``) and ``docs`` (documentation,
docstrings, examples, benchmarks).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from composer import Callback, Event, State, Trainer
from composer.loggers import Logger
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Two CPU threads are all CI has; more only adds contention between test workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))

N_FEATURES, N_CLASSES = 6, 4

ROOT = Path(__file__).resolve().parents[1]
DOCS, EXAMPLES, TEST_DATA = ROOT / 'docs', ROOT / 'examples', Path(__file__).resolve().parent / 'data'
#: Composer's launcher, installed beside the interpreter running the tests.
LAUNCHER = Path(sys.executable).with_name('composer')


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


@pytest.fixture
def one_thread():
    """Train on one thread for the duration of a test (use with ``pytest.mark.usefixtures('one_thread')``).

    The tiny models gain nothing from two, and on a CPU shared with other jobs two OpenMP threads contending for
    the cores were measured to make a training step several times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port that nothing listens on now, on any local address (as a launch's master binds it); another
    program may still take it before it is bound (see :func:`run_script`)."""
    with socket.socket() as s:
        s.bind(('', 0))
        return s.getsockname()[1]


def run_script(script: Path, *args: str, processes: int = 1, timeout: int = 300) -> None:
    """Run ``script`` with ``args`` as one Python process, or as several under Composer's launcher (gloo on a CPU),
    from the repository root; fail with the end of every rank's output if it fails.

    Under the launcher, rank 0's output goes through the launcher's and every other rank's to files of its own
    (the launcher's ``--stdout`` / ``--stderr``), so the failure's message shows the end of each rank's stdout and
    stderr: an error on any rank is seen. A launch that fails because its master port was taken between being
    found free and being bound (``EADDRINUSE``) is run once more on another port. A launch that runs past
    ``timeout`` seconds is killed, with every process it started.
    """
    import signal
    import tempfile

    def read(path: Path) -> str:
        return path.read_text(errors='replace') if path.exists() else f'(no {path.name})'

    # tests/ too: the scripts import the tiny models the tests share (tests/tiny_models.py).
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), str(ROOT / 'tests')]), 'OMP_NUM_THREADS': '1'}
    ports: list[int] = []
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix='run_script_') as logs:
            command = [sys.executable]
            if processes > 1:
                ports.append(free_port())
                command = [str(LAUNCHER), '-n', str(processes), '--master_port', str(ports[-1])]
                command += [
                    '--stdout',
                    f'{logs}/rank{{rank}}.stdout.txt',
                    '--stderr',
                    f'{logs}/rank{{rank}}.stderr.txt',
                ]
            # A session of its own: on a timeout the launcher and the ranks it started are killed together.
            launch = subprocess.Popen(
                [*command, str(script), *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                stdout, stderr = launch.communicate(timeout=timeout)
                failure = f'exited with code {launch.returncode}' if launch.returncode else ''
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(launch.pid, signal.SIGKILL)
                except ProcessLookupError:  # all of them ended meanwhile
                    pass
                stdout, stderr = launch.communicate()
                failure = f'ran past its timeout of {timeout} s and was killed'
            if not failure:
                return
            outputs = {'rank 0 (through the launcher)' if processes > 1 else 'the process': (stdout, stderr)}
            for rank in range(1, processes):
                outputs[f'rank {rank}'] = (
                    read(Path(logs, f'rank{rank}.stdout.txt')),
                    read(Path(logs, f'rank{rank}.stderr.txt')),
                )
        texts = [text.lower() for pair in outputs.values() for text in pair]
        port_taken = any('eaddrinuse' in text or 'address already in use' in text for text in texts)
        if not (processes > 1 and port_taken and attempt == 1):
            break
    on = f'on {processes} processes (master ports tried: {ports})' if processes > 1 else 'in one process'
    sections = [f'{Path(script).name} {" ".join(args)} {on} {failure}.']
    for name, (out, err) in outputs.items():
        sections += [f'----- {name}: stdout (end) -----', out[-3000:], f'----- {name}: stderr (end) -----', err[-3000:]]
    raise AssertionError('\n'.join(sections))


def fit(
    student: nn.Module,
    algorithms: Any,
    dataloader: Any = None,
    max_duration: str = '1ep',
    callbacks: Any = (),
    seed: int = 17,
    **kwargs: Any,
) -> Trainer:
    """A CPU ``Trainer`` fit of ``student`` with ``algorithms`` (default data: :func:`make_dataloader`)."""
    trainer = Trainer(
        model=student,
        train_dataloader=dataloader if dataloader is not None else make_dataloader(),
        max_duration=max_duration,
        algorithms=algorithms,
        callbacks=list(callbacks),
        progress_bar=False,
        device=kwargs.pop('device', 'cpu'),
        seed=seed,
        **kwargs,
    )
    trainer.fit()
    return trainer


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


class AfterLossRecorder(Callback):
    """Keeps, per microbatch, what the trainer held right after the loss (algorithms run before callbacks).

    Each step is a dict: ``batch_index``, ``batch`` (a copy), ``inputs`` and ``targets`` (the first two entries of
    a tuple batch, else ``None``), ``outputs`` (a copy), ``logits`` (the outputs, or their ``'logits'`` entry) and
    ``loss`` (the loss dict, or the bare loss tensor when no algorithm combined it).
    """

    def __init__(self):
        self.steps: list[dict[str, Any]] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event != Event.AFTER_LOSS:
            return
        batch, outputs = _detached(state.batch), _detached(state.outputs)
        pair = isinstance(batch, (list, tuple))
        self.steps.append(
            {
                'batch_index': int(state.timestamp.batch),
                'batch': batch,
                'inputs': batch[0] if pair else None,
                'targets': batch[1] if pair and len(batch) > 1 else None,
                'outputs': outputs,
                'logits': outputs.get('logits') if isinstance(outputs, dict) else outputs,
                'loss': _detached(state.loss),
            }
        )


class Preempted(Exception):
    """What :class:`Preempt` raises."""


class Preempt(Callback):
    """Stops a run as a preempted job would: with an error as batch ``batch`` (counted from 0) starts, after the
    checkpoint written when the batch before it ended."""

    def __init__(self, batch: int):
        self.batch = batch

    def batch_start(self, state, logger):
        if int(state.timestamp.batch) == self.batch:
            raise Preempted(f'preempted at batch {self.batch}')


@pytest.fixture(scope='module')
def nondeterministic_algorithms_allowed():
    """PyTorch's int8 kernels have no deterministic version, and tests that use Composer's deterministic_mode
    leave deterministic algorithms switched on for the process: off for the module, restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(previous)


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py``, which is a script directory rather than a package."""
    spec = importlib.util.spec_from_file_location(f'composer_kd_example_{name}', EXAMPLES / f'{name}.py')
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def small_cnn(n_classes: int = N_CLASSES, seed: int | None = None) -> nn.Module:
    """A one-convolution CNN with BatchNorm for 3-channel images."""
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, n_classes),
    )


S3_BUCKET = 'teachers'


@pytest.fixture(scope='module')
def s3_endpoint():
    """moto's S3 server in its own process, on 127.0.0.1 only, stopped after the module's tests."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name('moto_server')), '-H', '127.0.0.1', '-p', str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(('127.0.0.1', port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError('moto_server did not start') from None
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    # Composer's S3ObjectStore reads these; the credentials are moto's dummies.
    for key, value in {
        'S3_ENDPOINT_URL': s3_endpoint,
        'AWS_ACCESS_KEY_ID': 'testing',
        'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_DEFAULT_REGION': 'us-east-1',
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    client = boto3.client('s3', endpoint_url=s3_endpoint)
    if S3_BUCKET not in [b['Name'] for b in client.list_buckets().get('Buckets', [])]:
        client.create_bucket(Bucket=S3_BUCKET)
    return client
