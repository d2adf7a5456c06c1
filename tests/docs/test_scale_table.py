"""docs/scale.md's table of features against parallelism: every cell gives one of its three verdicts and names the
tests that keep it, and each test file named exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERDICTS = ('tested on CPU', 'gpu test only', 'refused')
COLUMNS = ['feature', 'one process', 'DDP', 'FSDP 2', 'FSDP 1']


def table_rows() -> list[list[str]]:
    text = (ROOT / 'docs' / 'scale.md').read_text()
    section = text.split('## Every feature against every parallelism', 1)[1].split('\n## ', 1)[0]
    lines = [line for line in section.splitlines() if line.startswith('|')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    assert header == COLUMNS
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]


def test_every_cell_gives_a_verdict_and_names_its_tests():
    rows = table_rows()
    features = [row[0] for row in rows]
    assert features == [
        'plain (live teachers)',
        'teacher cache',
        'feature pairs (learned projections)',
        'fused output layer',
        'on-policy',
        'training from a teacher signal',
    ]
    for row in rows:
        for column, cell in zip(COLUMNS[1:], row[1:], strict=True):
            assert cell.startswith(VERDICTS), f'{row[0]} / {column}: {cell!r}'
            named = re.findall(r'`(tests/[^`:]+\.py)', cell)
            assert named, f'{row[0]} / {column} names no test'
            for path in named:
                assert (ROOT / path).is_file(), f'{row[0]} / {column}: {path} does not exist'
            if cell.startswith('gpu test only'):
                assert any('/gpu/' in path for path in named), f'{row[0]} / {column}: no gpu test named'
