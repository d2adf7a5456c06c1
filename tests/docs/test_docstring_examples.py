"""The ``.. testcode::`` example of every public docstring runs, and every exported name documents itself.

Examples are found in the docstrings of each public module of the package: the module itself, every name in its
``__all__``, and those names' public methods and properties. Each runs on its own, in a fresh namespace and a
temporary working directory, as a reader would paste it.
"""

from __future__ import annotations

import inspect
import pkgutil
import re
import textwrap
from collections.abc import Iterator

import pytest

import composer_kd

DIRECTIVE = re.compile(r'^(?P<indent>[ \t]*)\.\. testcode::[ \t]*$')


def examples_in(docstring: str) -> list[str]:
    """The code of every ``.. testcode::`` directive in ``docstring`` (options such as ``:hide:`` dropped)."""
    lines = inspect.cleandoc(docstring).splitlines()
    blocks = []
    for i, line in enumerate(lines):
        match = DIRECTIVE.match(line)
        if not match:
            continue
        indent = len(match['indent'])
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        code = textwrap.dedent('\n'.join(body))
        code = '\n'.join(row for row in code.splitlines() if not re.match(r'^:[\w-]+:', row))
        blocks.append(code.strip('\n'))
    return blocks


def public_modules() -> Iterator[object]:
    yield composer_kd
    for info in pkgutil.walk_packages(composer_kd.__path__, prefix='composer_kd.'):
        if not any(part.startswith('_') for part in info.name.split('.')):
            yield __import__(info.name, fromlist=['_'])


def documented_objects() -> Iterator[tuple[str, object]]:
    """``(qualified name, object)`` for every module, exported name and public member thereof; each once."""
    seen: set[int] = set()
    for module in public_modules():
        candidates = [(module.__name__, module)]
        for name in getattr(module, '__all__', []):
            obj = getattr(module, name)
            candidates.append((f'{module.__name__}.{name}', obj))
            if inspect.isclass(obj):
                for member_name, member in vars(obj).items():
                    if not member_name.startswith('_'):
                        candidates.append((f'{module.__name__}.{name}.{member_name}', member))
        for qualname, obj in candidates:
            if id(obj) in seen or not (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)):
                continue
            if isinstance(obj, property):
                obj = obj.fget
            seen.add(id(obj))
            yield qualname, obj


EXAMPLES = [
    (f'{qualname}[{i}]', code)
    for qualname, obj in documented_objects()
    for i, code in enumerate(examples_in(inspect.getdoc(obj) or ''))
]


def test_examples_are_found():
    assert len(EXAMPLES) >= 30


@pytest.mark.parametrize(('where', 'code'), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_docstring_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, 'exec'), {'__name__': where})


def test_directive_parsing():
    docstring = """Title.

    Example:
        .. testcode::
            :hide:

            x = 1
            if x:
                y = 2

        After.
    """
    assert examples_in(docstring) == ['x = 1\nif x:\n    y = 2']


def is_callable_instance_type(cls: type) -> bool:
    """Classes whose instances are called for a result (losses, schedules): their docstring says what it is."""
    return any(name in vars(klass) for klass in cls.__mro__[:-1] for name in ('forward', '__call__'))


@pytest.mark.parametrize('name', composer_kd.__all__)
def test_exported_names_have_args_returns_and_an_example(name):
    obj = getattr(composer_kd, name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        pytest.skip(f'{name} is a constant')
    doc = inspect.getdoc(obj) or ''
    needed = ['Example:', '.. testcode::']
    if inspect.isfunction(obj):
        needed += ['Args:', 'Returns:']
    else:
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        try:
            takes_arguments = any(p.kind not in variadic for p in inspect.signature(obj).parameters.values())
        except ValueError:  # a class built on a builtin's constructor (an exception) has no signature to read
            takes_arguments = True
        needed += ['Args:'] if takes_arguments else []
        needed += ['Returns:'] if is_callable_instance_type(obj) and obj.__module__.startswith('composer_kd') else []
    missing = [section for section in needed if section not in doc]
    assert not missing, f'{name} docstring lacks {missing}'
