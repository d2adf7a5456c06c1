"""The Python blocks of docs/nlp_minilm.md run as written, in order, as a reader would run them."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import DOCS

PAGE = DOCS / 'nlp_minilm.md'
BLOCKS = re.findall(r'```python\n(.*?)```', PAGE.read_text(), flags=re.DOTALL)


def test_page_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    assert len(BLOCKS) == 3
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    namespace: dict = {}
    try:
        for block in BLOCKS:
            exec(compile(block, str(PAGE), 'exec'), namespace)
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "('business', 'entertainment', 'politics', 'sports', 'tech')"
    assert printed[1] == "{'train': 1257, 'val': 419, 'test': 420}"
    assert printed[3].startswith('6 384 [')
    trainer = namespace['trainer']
    assert namespace['student'].model.config.num_hidden_layers == 2
    assert int(trainer.state.timestamp.batch) == 2
    assert set(trainer.state.loss) == {'original', 'kd', 'total'}
    loss = {name: float(value) for name, value in trainer.state.loss.items()}
    assert loss['total'] == pytest.approx(0.5 * loss['original'] + 0.5 * loss['kd'], rel=1e-5)
