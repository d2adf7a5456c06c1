"""The tests' multi-process launcher, ``run_script`` of conftest: a failure on any rank shows every rank's output,
and a master port taken before the launcher binds it is retried once on another."""

from __future__ import annotations

import socket

import conftest
import pytest

FAILS_ON_RANK_1 = """
import os, sys, time
from pathlib import Path

rank, done = os.environ['RANK'], Path(sys.argv[1]) / 'rank0.done'
print(f'stdout of rank {rank}')
print(f'stderr of rank {rank}', file=sys.stderr, flush=True)
if rank == '0':
    done.touch()
else:
    for _ in range(600):  # rank 0 first, so that the launcher does not stop it before it has printed
        if done.exists():
            break
        time.sleep(0.1)
    raise SystemExit('rank 1 failed on purpose')
"""

BINDS_THE_MASTER_PORT = """
import os, sys
from pathlib import Path

if os.environ['RANK'] == '0':
    import torch.distributed

    # What a process group's master does first: a key-value store listening on MASTER_PORT.
    store = torch.distributed.TCPStore('127.0.0.1', int(os.environ['MASTER_PORT']), 1, True)
    (Path(sys.argv[1]) / 'bound').write_text(os.environ['MASTER_PORT'])
"""


@pytest.fixture
def ports(monkeypatch) -> list[int]:
    """The master ports ``run_script`` picks, in order."""
    picked: list[int] = []
    pick = conftest.free_port

    def recorded() -> int:
        picked.append(pick())
        return picked[-1]

    monkeypatch.setattr(conftest, 'free_port', recorded)
    return picked


def test_a_failure_on_rank_1_shows_every_ranks_output(tmp_path, ports):
    script = tmp_path / 'fails_on_rank_1.py'
    script.write_text(FAILS_ON_RANK_1)
    with pytest.raises(AssertionError) as failure:
        conftest.run_script(script, str(tmp_path), processes=2, timeout=120)
    message = str(failure.value)
    for text in ('stdout of rank 0', 'stderr of rank 0', 'stdout of rank 1', 'stderr of rank 1'):
        assert text in message
    rank_1 = message[message.index('----- rank 1: stderr (end) -----') :]
    assert 'rank 1 failed on purpose' in rank_1
    assert len(ports) == 1  # not a port in use: not retried


def test_a_master_port_taken_before_the_launch_is_retried_on_another(tmp_path, monkeypatch):
    # The first port found free is bound by another program before the launcher binds it; the next one is free.
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    taken_port = taken.getsockname()[1]
    pick = conftest.free_port
    ports: list[int] = []

    def free_port() -> int:
        ports.append(pick() if ports else taken_port)
        return ports[-1]

    monkeypatch.setattr(conftest, 'free_port', free_port)
    script = tmp_path / 'binds_the_master_port.py'
    script.write_text(BINDS_THE_MASTER_PORT)
    try:
        conftest.run_script(script, str(tmp_path), processes=2, timeout=120)
    finally:
        taken.close()
    assert len(ports) == 2 and ports[0] == taken_port != ports[1]
    assert (tmp_path / 'bound').read_text() == str(ports[1])
