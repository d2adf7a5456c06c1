"""Every code block in README.md and docs/*.md works as written.

Python blocks run, in tiny settings: the blocks of one page run in order in one namespace, as a reader would run
them, in a fresh working directory. YAML blocks are recipes: each is loaded and checked by the recipe loader, as
``composer-kd train`` would before training. Shell and text blocks show commands and output and are not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

from composer_kd.recipes import check_recipe, load_recipe

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
FENCE = re.compile(r'^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$', flags=re.DOTALL | re.MULTILINE)


def code_blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced block in ``page`` whose info string is exactly ``language``."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match['info'].strip() == language:
            line = text.count('\n', 0, match.start('body')) + 1
            blocks.append((line, match['body']))
    return blocks


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


PYTHON_PAGES = [page for page in PAGES if code_blocks(page, 'python')]
YAML_BLOCKS = [(page, line, code) for page in PAGES for line, code in code_blocks(page, 'yaml')]


def test_fences_are_recognised():
    # Guards the extraction itself: the README holds a quickstart and the docs more than a handful of blocks.
    assert len(code_blocks(ROOT / 'README.md', 'python')) >= 2
    assert sum(len(code_blocks(page, 'python')) for page in PAGES) >= 10


def run_page(page: Path) -> dict:
    namespace: dict = {'__name__': f'docs_{page.stem}'}
    for line, code in code_blocks(page, 'python'):
        # Padding to the block's line makes a traceback point at the page's own line numbers.
        exec(compile('\n' * (line - 1) + code, str(page), 'exec'), namespace)
    return namespace


@pytest.mark.parametrize('page', PYTHON_PAGES, ids=page_id)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_page(page)
    if page.name == 'README.md':
        trainer = namespace['trainer']  # the quickstart's
        assert int(trainer.state.timestamp.epoch) == 2
        assert set(trainer.state.loss) == {'original', 'kd', 'total'}


@pytest.mark.parametrize(
    ('page', 'line', 'code'), YAML_BLOCKS, ids=[f'{page_id(p)}:{line}' for p, line, _ in YAML_BLOCKS]
)
def test_yaml_blocks_are_valid_recipes(page, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'recipe.yaml'
    path.write_text(code)
    recipe = load_recipe(path)
    assert check_recipe(recipe) == [], f'{page_id(page)}:{line}'
