"""Every Python block in the README runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
BLOCKS = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.DOTALL)


def test_readme_has_a_quickstart():
    assert len(BLOCKS) >= 2


def test_quickstart_trains_with_distillation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(BLOCKS[0], str(README), 'exec'), namespace)
    trainer = namespace['trainer']
    assert int(trainer.state.timestamp.epoch) == 2
    assert set(trainer.state.loss) == {'original', 'kd', 'total'}


@pytest.mark.parametrize('index', range(1, len(BLOCKS)))
def test_other_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], str(README), 'exec'), {})
