"""Every Python block of docs/compression.md runs exactly as written."""

from __future__ import annotations

import re

import pytest
from conftest import DOCS

PAGE = DOCS / 'compression.md'
BLOCKS = re.findall(r'```python\n(.*?)```', PAGE.read_text(), flags=re.DOTALL)


def test_the_page_shows_quantization_pruning_and_recipes():
    assert len(BLOCKS) == 3


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_block_runs(index, tmp_path, monkeypatch, nondeterministic_algorithms_allowed):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(BLOCKS[index], str(PAGE), 'exec'), namespace)
    if 'int8_student' in namespace:
        assert type(namespace['int8_student']).__name__ == 'ComposerClassifier'
