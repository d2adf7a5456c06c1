"""Every promise in the pages leads to the test that keeps it, and every test a page names exists.

A promise is a sentence of README.md, examples/README.md or docs/*.md (outside code blocks and headings) that says
``exactly``, ``bit-identical``, ``tested`` or ``refused``. Each must name a test file that exists, in its text
(`` `tests/end_to_end/fit/test_cache.py` ``) or in an HTML comment inside it or right after its full stop
(``<!-- tests/end_to_end/fit/test_cache.py -->``, invisible once rendered). A name may end in ``::test_name``,
which must be a test function of that file. A sentence ends at ``.``, ``?`` or ``!`` followed by a space and a
capital letter, a backtick or an opening bracket (also after an HTML comment that follows a full stop), at a blank
line, and at the end of a list item; a table row is one sentence, whatever its cells say.

The chunked KL's memory ratio, which the pages give for two machines, is checked against the results files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import ROOT

PAGES = [ROOT / 'README.md', ROOT / 'examples' / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
PROMISE = re.compile(r'\b(exactly|bit-identical|tested|refused)\b', flags=re.IGNORECASE)
TEST_PATH = re.compile(r'\btests/[\w/.-]+\.py(?:::\w+)?')
SENTENCE_END = re.compile(r'(?:(?<=[.?!])|(?<=-->))\s+(?=[A-Z`(\[*])')
BLOCK_START = re.compile(r'^(\s*[-*] |\s*\d+\. |\|)')


class Sentence(NamedTuple):
    page: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f'{self.page.relative_to(ROOT)}:{self.line}: {self.text}'


def blocks(page: Path) -> list[list[tuple[int, str]]]:
    """The ``(line number, line)`` of each paragraph, list item and table row outside fenced code and headings."""
    found: list[list[tuple[int, str]]] = []
    fenced = False
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if line.lstrip().startswith('```'):
            fenced = not fenced
            found.append([])
            continue
        if fenced or not line.strip() or line.startswith('#'):
            found.append([])
            continue
        if BLOCK_START.match(line) or not found or not found[-1] or found[-1][0][1].startswith('|'):
            found.append([])
        found[-1].append((number, line.strip()))
    return [block for block in found if block]


def sentences(page: Path) -> list[Sentence]:
    """Each table row whole; each paragraph and list item cut into sentences, each with the line it starts on."""
    found = []
    for block in blocks(page):
        text = ' '.join(line for _, line in block)
        if text.startswith('|'):
            found.append(Sentence(page, block[0][0], text))
            continue
        starts, offset = [], 0  # where each line begins in the joined text
        for number, line in block:
            starts.append((offset, number))
            offset += len(line) + 1
        position = 0
        for piece in SENTENCE_END.split(text):
            begin = text.index(piece, position)
            line = max(number for start, number in starts if start <= begin)
            position = begin + len(piece)
            if piece.strip():
                found.append(Sentence(page, line, piece))
    return found


def promises() -> list[Sentence]:
    return [sentence for page in PAGES for sentence in sentences(page) if PROMISE.search(sentence.text)]


def missing(cited: str) -> str | None:
    """Why ``cited`` (``tests/...py`` or ``tests/...py::test_name``) names no test, or ``None``."""
    path, _, name = cited.partition('::')
    file = ROOT / path
    if not file.is_file():
        return f'{path} does not exist'
    if name and not re.search(rf'^\s*def {re.escape(name)}\(', file.read_text(), flags=re.MULTILINE):
        return f'{path} has no test function {name}'
    return None


def test_pages_and_promises_are_found():
    # Guards the reading itself: the pages exist and hold both promises and citations.
    assert all(page.is_file() for page in PAGES)
    found = promises()
    assert len(found) > 50
    assert sum(bool(TEST_PATH.search(sentence.text)) for sentence in found) > 20


def test_every_promise_cites_a_test():
    uncited = [str(sentence) for sentence in promises() if not TEST_PATH.search(sentence.text)]
    assert not uncited, (
        'These sentences promise (exactly, bit-identical, tested, refused) without naming the test that keeps them; '
        'name it in the sentence or in an HTML comment right after it, <!-- tests/....py -->:\n' + '\n'.join(uncited)
    )


@pytest.mark.parametrize('page', PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_test_a_page_names_exists(page):
    named = [(sentence, cited) for sentence in sentences(page) for cited in TEST_PATH.findall(sentence.text)]
    named += [(Sentence(page, 0, 'a code block'), cited) for cited in TEST_PATH.findall(code_only(page))]
    wrong = [f'{sentence}\n  -> {missing(cited)}' for sentence, cited in named if missing(cited)]
    assert not wrong, 'Test names that lead nowhere:\n' + '\n'.join(wrong)


def code_only(page: Path) -> str:
    return '\n'.join(re.findall(r'^```[^\n]*\n(.*?)^```', page.read_text(), flags=re.DOTALL | re.MULTILINE))


def test_the_rules_on_a_page_written_for_them(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text(
        '# A title that is refused\n\n'
        'Resumes exactly (`tests/docs/test_claims.py`). Bad input is refused. <!-- tests/docs/test_claims.py -->\n'
        'It is tested, e.g. here. Nothing else.\n\n'
        '- a list item, refused\n'
        '  over two lines\n'
        '| table | row, bit-identical |\n'
        '| another row | refused. Two sentences, one row |\n\n'
        '```python\nx = 1  # refused, but code\n```\n'
    )
    found = [(s.line, s.text) for s in sentences(page) if PROMISE.search(s.text)]
    assert found == [
        (3, 'Resumes exactly (`tests/docs/test_claims.py`).'),
        (3, 'Bad input is refused. <!-- tests/docs/test_claims.py -->'),
        (4, 'It is tested, e.g. here.'),
        (6, '- a list item, refused over two lines'),
        (8, '| table | row, bit-identical |'),
        (9, '| another row | refused. Two sentences, one row |'),
    ]
    assert missing('tests/docs/test_claims.py::test_the_rules_on_a_page_written_for_them') is None
    assert (
        missing('tests/docs/test_claims.py::no_such_test')
        == 'tests/docs/test_claims.py has no test function no_such_test'
    )
    assert missing('tests/test_multiprocess.py') == 'tests/test_multiprocess.py does not exist'


def measured(results: str, figure: str) -> float:
    """A figure of a ``benchmarks/results`` table: ``| figure | value |``."""
    text = (ROOT / 'benchmarks' / 'results' / results).read_text()
    return float(re.search(rf'^\| {re.escape(figure)} \| ([\d.]+)', text, flags=re.MULTILINE)[1])


@pytest.mark.parametrize('page', ['README.md', 'docs/method_card.md', 'docs/tutorial_lm.md', 'docs/scale.md'])
def test_the_chunked_kl_memory_figures_name_the_device_they_were_measured_on(page):
    """Each page gives the chunked KL's memory ratio with both measurements, the CPU's and the H100's, each next to
    the name of its machine and its results file."""
    cpu = measured('cpu.md', 'extra peak memory, chunked / naive')
    h100 = measured('h100.md', 'extra peak memory, chunked / naive')
    paragraphs = [' '.join(text for _, text in block) for block in blocks(ROOT / page)]
    (paragraph,) = [p for p in paragraphs if 'benchmarks/results/h100.md' in p and 'chunk' in p.lower()]
    assert f'{cpu:.2f}' in paragraph and f'{h100:.2f}' in paragraph
    assert 'CPU' in paragraph and 'H100' in paragraph
    # And "a quarter", where a page says it, is the H100's figure.
    if 'a quarter' in paragraph:
        assert abs(h100 - 0.25) < 0.01
        assert re.search(r'a quarter[^.;]*H100', paragraph)
