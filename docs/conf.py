"""Sphinx configuration: Markdown (MyST) pages, and the API reference generated from the docstrings.

Build with ``make docs`` (or ``python -m sphinx -W --keep-going -b html docs docs/_build/html``); the test suite
builds it the same way, warnings as errors.
"""

from __future__ import annotations

import os
import sys

# The package is imported from this checkout, whether or not it is installed.
sys.path.insert(0, os.path.abspath('..'))

import composer_kd  # noqa: E402

project = 'composer-kd'
author = 'composer-kd contributors'
copyright = 'composer-kd contributors'
release = composer_kd.__version__
version = release

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    # Renders the ``.. testcode::`` examples in docstrings; tests/docs/test_docstring_examples.py runs them.
    'sphinx.ext.doctest',
    'sphinx.ext.viewcode',
]

source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
root_doc = 'index'
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']

myst_enable_extensions = ['colon_fence', 'deflist']
# Headings up to level 3 get anchors, so pages can link to each other's sections (page.md#section).
myst_heading_anchors = 3

# The code's docstrings are Google style.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes sections become fields of their class: a NamedTuple's fields are also members, documented twice otherwise.
napoleon_use_ivar = True
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_typehints_description_target = 'documented'
# Members without a docstring of their own (nn.Module.forward overrides) are left out rather than showing torch's.
autodoc_inherit_docstrings = False
autodoc_default_options = {'members': True, 'show-inheritance': True}
# Heavy optional imports are real dependencies here, so nothing is mocked: a docstring that fails to import fails
# the build.

html_theme = 'furo'
html_title = f'composer-kd {release}'

# Pages that other work adds to docs/ and the index already lists. Until such a page exists its toctree line is
# dropped, rather than the build failing on it; once it exists it is an ordinary entry, checked like any other.
PAGES_ADDED_ELSEWHERE = ('api', 'caching', 'compression', 'multitask', 'nlp_minilm')


def _drop_absent_pages(app, docname: str, source: list[str]) -> None:
    if docname != root_doc:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    absent = {page for page in PAGES_ADDED_ELSEWHERE if not os.path.exists(os.path.join(here, f'{page}.md'))}
    lines = source[0].splitlines(keepends=True)
    source[0] = ''.join(line for line in lines if line.strip() not in absent)


def setup(app):
    app.connect('source-read', _drop_absent_pages)
