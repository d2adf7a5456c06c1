"""Every Python block of the Markdown pages in docs/ runs as written, each page's blocks in order in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / 'docs'
PAGES = {page.name: re.findall(r'```python\n(.*?)```', page.read_text(), flags=re.DOTALL) for page in DOCS.glob('*.md')}


@pytest.mark.parametrize('name', sorted(name for name, blocks in PAGES.items() if blocks))
def test_page_blocks_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a second thread only contends with other jobs
    try:
        namespace: dict = {}
        for i, block in enumerate(PAGES[name]):
            exec(compile(block, f'{DOCS / name} (python block {i})', 'exec'), namespace)
    finally:
        torch.set_num_threads(threads)
