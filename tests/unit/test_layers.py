"""The package's layers, each a few top-level folders and modules, import one way: foundation <- losses <- models <-
teacher data <- parts <- algorithm <- running <- integrations <- recipes <- commands.

``import composer_kd`` loads neither the recipes nor their optional packages, the ``composer-kd`` command answers
``--help`` and lists its recipes without torch or Composer, the modules of the package import each other without a
cycle and never upwards, and ``docs/architecture.md`` shows the layers as they import (:func:`layer_diagram`).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import composer_kd

PACKAGE = Path(composer_kd.__file__).resolve().parent
ROOT = PACKAGE.parent

# The layers, lowest first, and the top-level folders and modules of composer_kd in each. A module's layer is its
# top-level folder's (or its own name's, for the few modules at the top): there is no default, so a new folder or
# top-level module must be placed here before the suite passes.
LAYERS = (
    ('foundation', ('lazy', 'options')),
    ('losses', ('losses',)),
    ('models', ('models', 'schedules', 'window')),
    ('teacher data', ('cache', 'signal')),
    ('parts', ('parts',)),
    ('algorithm', ('distillation', 'multitask', 'compression')),
    ('running', ('run',)),
    ('integrations', ('llm',)),
    ('recipes', ('recipes',)),
    ('commands', ('cli',)),
)
LAYER_NAMES = tuple(name for name, _ in LAYERS)
LAYER_OF = {member: level for level, (_, members) in enumerate(LAYERS) for member in members}
# What only the recipe and command layers may import: the `demo` extra, and the recipes' YAML reader.
OPTIONAL = ('sklearn', 'matplotlib', 'omegaconf')
# The `llm` extra: imported by the integrations layer (and above) only.
LLM_OPTIONAL = ('llmfoundry',)


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, with this checkout first on the path."""
    return subprocess.run(
        [sys.executable, '-c', code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'PYTHONPATH': str(ROOT)},
    )


def top_level(module: str) -> str:
    """The top-level folder or module of ``composer_kd`` that ``module`` belongs to."""
    return module.split('.')[1]


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``'s layer (a KeyError for a module placed nowhere)."""
    return LAYER_OF[top_level(module)]


def package_modules() -> dict[str, Path]:
    """``{module name: source file}`` for every module of the package, the package itself included."""
    modules = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(ROOT).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        modules[name] = path
    return modules


MODULES = package_modules()


def lazy_exports(package: str) -> dict[str, str]:
    """``{name: module}`` of a package whose names are imported on first use; empty for any other."""
    if MODULES[package].name != '__init__.py':
        return {}
    return dict(getattr(importlib.import_module(package), 'EXPORTS', {}))


def imported(module: str, node: ast.AST) -> list[str]:
    """The modules an import statement of ``module`` brings in: of this package, or third-party roots."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ''
    if node.level:
        package = module.split('.') if MODULES[module].name == '__init__.py' else module.split('.')[:-1]
        base = '.'.join(package[: len(package) - node.level + 1] + ([base] if base else []))
    if not base.startswith('composer_kd'):
        return [base]
    found = []
    for alias in node.names:
        lazy = lazy_exports(base) if base in MODULES else {}
        if f'{base}.{alias.name}' in MODULES:
            found.append(f'{base}.{alias.name}')
        elif alias.name in lazy:
            found.append(lazy[alias.name])
        else:
            found.append(base)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, from every import statement, in functions too.

    Imports inside a function count as much as those at the top: an import deferred to dodge a cycle is a cycle.
    The package's own ``__init__`` is left out: it imports nothing when it runs (its names load on first use),
    and what it names under ``TYPE_CHECKING`` is every layer's by design.
    """
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        if module == 'composer_kd':
            continue
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(m for m in imported(module, node) if m in MODULES and m not in (module, 'composer_kd'))
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node], path[len(path) :] = 'open', [node]
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 'open':
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = 'done'
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def layer_diagram() -> str:
    """The diagram at the top of ``docs/architecture.md``, from :data:`LAYERS` and :func:`import_graph`.

    One row per layer, the highest first: the layer's folders (with a slash) and top-level modules, each followed by
    the other layers its modules import, highest first. Print it with ``python tests/unit/test_layers.py``.
    """
    graph = import_graph()
    rows = ['layer         folders/ and modules (the other layers each imports)']
    for level in reversed(range(len(LAYERS))):
        name, members = LAYERS[level]
        entries = []
        for member in members:
            targets = {target for module, imports in graph.items() if top_level(module) == member for target in imports}
            others = sorted({layer(target) for target in targets} - {level}, reverse=True)
            folder = f'{member}/' if (PACKAGE / member).is_dir() else member
            entries.append(f'{folder} ({", ".join(LAYER_NAMES[other] for other in others) or "none"})')
        rows.append(f'{name:<14}' + '  '.join(entries))
    return '```text\n' + '\n'.join(rows) + '\n```\n'


def test_every_module_imports_in_a_fresh_interpreter():
    result = run_python(
        'import importlib, pkgutil, composer_kd\n'
        "for info in pkgutil.walk_packages(composer_kd.__path__, 'composer_kd.'):\n"
        '    importlib.import_module(info.name)\n'
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_module_has_a_layer_and_few_stay_at_the_top():
    unplaced = sorted({top_level(m) for m in MODULES if m != 'composer_kd'} - set(LAYER_OF))
    assert not unplaced, f'place these in LAYERS: {unplaced}'
    loose = sorted(path.name for path in PACKAGE.glob('*.py'))
    assert len(loose) <= 8, loose


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, 'import cycle: ' + ' -> '.join(cycle)


def test_the_architecture_page_shows_the_layers_as_they_import():
    expected = layer_diagram()
    page = (ROOT / 'docs' / 'architecture.md').read_text()
    assert expected in page, f'docs/architecture.md: replace the diagram at the top with\n{expected}'


def test_no_module_imports_a_higher_layer():
    upward = [
        f'{module} ({LAYER_NAMES[layer(module)]}) imports {target} ({LAYER_NAMES[layer(target)]})'
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert not upward, '\n'.join(upward)


def test_core_and_reporting_import_no_optional_package():
    found = []
    for module, path in MODULES.items():
        if module == 'composer_kd' or layer(module) > LAYER_NAMES.index('running'):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [
                    f'{module} imports {m}'
                    for m in imported(module, node)
                    if m.split('.')[0] in OPTIONAL + LLM_OPTIONAL
                ]
    assert not found, '\n'.join(found)


def test_the_llm_layer_says_to_install_the_extra_when_llm_foundry_is_missing():
    # A None entry in sys.modules makes `import llmfoundry` fail as it would where it is not installed.
    result = run_python(
        'import sys\n'
        "sys.modules['llmfoundry'] = None\n"
        'import composer_kd.llm\n'
        'try:\n'
        '    composer_kd.llm.FoundryDistillation\n'
        'except ImportError as e:\n'
        '    print(e)\n'
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install 'composer-kd[llm]'" in result.stdout


def test_the_graph_sees_imports_in_functions_and_through_lazy_packages():
    graph = import_graph()
    assert 'composer_kd.recipes.loader' in graph['composer_kd.cli.main']  # imported inside a subcommand
    assert imported('composer_kd.cli.demo', ast.parse('from composer_kd import Distillation').body[0]) == [
        'composer_kd.distillation'
    ]
    assert imported('composer_kd.cli.demo', ast.parse('from composer_kd.recipes import build_run').body[0]) == [
        'composer_kd.recipes.build'
    ]


def test_import_composer_kd_loads_only_itself():
    result = run_python(
        'import json, sys\n'
        'import composer_kd\n'
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'composer', 'omegaconf', 'sklearn', 'matplotlib') or m.startswith('composer_kd.recipes'))))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == []


def test_every_exported_name_loads_without_the_recipes_or_their_optional_packages():
    # Composer itself imports scikit-learn and matplotlib when they are installed (through torchmetrics and
    # transformers), so their presence in sys.modules says nothing about this package: every import statement
    # the package runs is recorded instead, with the module that runs it.
    result = run_python(
        'import builtins, json, sys\n'
        'runs = []\n'
        'plain_import = builtins.__import__\n'
        'def recording_import(name, globals=None, locals=None, fromlist=(), level=0):\n'
        "    importer = (globals or {}).get('__name__') or ''\n"
        "    if importer.startswith('composer_kd'):\n"
        '        runs.append([importer, name])\n'
        '    return plain_import(name, globals, locals, fromlist, level)\n'
        'builtins.__import__ = recording_import\n'
        'import composer_kd\n'
        'for name in composer_kd.__all__:\n'
        '    getattr(composer_kd, name)\n'
        "loaded = sorted(m for m in sys.modules if m.startswith('composer_kd.recipes') or m.split('.')[0] == "
        "'omegaconf')\n"
        "import composer_kd.recipes.text_data  # reads its split with scikit-learn: the recording's control\n"
        "print(json.dumps({'runs': runs, 'loaded': loaded}))\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report['loaded'] == []
    optional = [(importer, name) for importer, name in report['runs'] if name.split('.')[0] in OPTIONAL]
    assert optional == [('composer_kd.recipes.text_data', 'sklearn.model_selection')]


@pytest.mark.parametrize(
    'argv, allowed',
    [
        (['--help'], ()),
        (['train', '--help'], ()),
        (['demo', '--help'], ()),
        (['recipes'], ('omegaconf',)),
        (['recipes', 'digits'], ('omegaconf',)),
    ],
)
def test_the_command_answers_without_torch_or_composer(argv, allowed):
    result = run_python(
        'import json, runpy, sys\n'
        f"sys.argv = ['composer-kd', *{argv!r}]\n"
        'try:\n'
        "    runpy.run_module('composer_kd.cli', run_name='__main__')\n"
        'except SystemExit as e:\n'
        '    assert e.code in (0, None), e.code\n'
        "heavy = ('torch', 'composer', 'transformers', 'omegaconf', 'sklearn', 'matplotlib')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))), file=sys.stderr)\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()  # it answered
    assert json.loads(result.stderr.strip().splitlines()[-1]) == sorted(allowed)


def test_old_paths_still_import_what_moved():
    from composer_kd import data, text_data
    from composer_kd.losses import IGNORE_INDEX, cross_entropy_with_hidden_labels
    from composer_kd.recipes import data as recipe_data
    from composer_kd.recipes import report, run
    from composer_kd.recipes import text_data as recipe_text_data
    from composer_kd.recipes.build import evaluate_model, teacher_data_spec
    from composer_kd.recipes.loader import teacher_data_spec as loader_teacher_data_spec
    from composer_kd.recipes.models import classifier, count_parameters, hugging_face_classifier
    from composer_kd.recipes.validate import composer_algorithm, optimizer_class, task_teachers
    from composer_kd.run.reporting import RunSummary, format_summary
    from composer_kd.run.reporting import evaluate_model as reporting_evaluate_model

    for old, new in ((data, recipe_data), (text_data, recipe_text_data)):
        assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)
    assert (
        data.IGNORE_INDEX is IGNORE_INDEX and data.cross_entropy_with_hidden_labels is cross_entropy_with_hidden_labels
    )
    assert run.RunSummary is RunSummary and report.format_summary is format_summary
    assert evaluate_model is reporting_evaluate_model and teacher_data_spec is loader_teacher_data_spec
    assert classifier.__module__ == hugging_face_classifier.__module__ == 'composer_kd.run.adapters'
    assert count_parameters.__module__ == 'composer_kd.run.reporting'
    assert composer_algorithm('LabelSmoothing') is not None and optimizer_class('Adam') is not None
    assert task_teachers.__module__ == 'composer_kd.recipes.tasks'


def test_the_lazy_package_lists_and_loads_every_exported_name():
    assert sorted(composer_kd.EXPORTS) == sorted(composer_kd.__all__)
    assert set(composer_kd.__all__) <= set(dir(composer_kd))
    from composer_kd.recipes import EXPORTS
    from composer_kd.recipes import __all__ as recipe_names

    assert sorted(EXPORTS) == sorted(recipe_names)
    with pytest.raises(AttributeError, match="has no attribute 'Distilation'"):
        composer_kd.Distilation  # noqa: B018


def test_every_former_module_path_imports_the_module_where_it_lives_now():
    result = run_python(
        'import importlib, json, composer_kd\n'
        'same = {old: importlib.import_module(old) is importlib.import_module(new) '
        'for old, new in composer_kd.FORMER_PATHS.items()}\n'
        'from composer_kd.fused_distillation import Fused\n'
        'from composer_kd.parts.fused import Fused as NewFused\n'
        "same['from-import'] = Fused is NewFused\n"
        'print(json.dumps(same))\n'
    )
    assert result.returncode == 0, result.stderr[-3000:]
    same = json.loads(result.stdout)
    assert all(same.values()), same
    assert len(same) == len(composer_kd.FORMER_PATHS) + 1
    assert not any(
        (PACKAGE / (old.split('.', 1)[1].replace('.', '/') + '.py')).exists() for old in composer_kd.FORMER_PATHS
    )


if __name__ == '__main__':
    print(layer_diagram(), end='')
