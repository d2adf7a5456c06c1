"""The README's Python quickstart runs exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks(text: str) -> list[str]:
    return re.findall(r'```python\n(.*?)```', text, flags=re.DOTALL)


def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert blocks, 'README has no python code block'
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), 'exec'), namespace)
    trainer = namespace['trainer']
    assert int(trainer.state.timestamp.epoch) == 2
    assert 'kd' in trainer.state.loss
