"""Reading a recipe: YAML file or built-in name, command-line overrides, and the check against the schema.

Every problem found is reported at once, each naming its full dotted key (the form an override takes, e.g.
``teachers.0.checkpoint``) and what was expected. Nothing is built or trained until a recipe passes.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_kd.options import did_you_mean
from composer_kd.recipes.schema import SECTION, DataSpec, Recipe

__all__ = [
    'Problems',
    'RecipeError',
    'builtin_recipes',
    'load_recipe',
    'nearest',
    'read_recipe_config',
    'resolve_recipe_source',
    'teacher_data_spec',
]

# Lists whose entries may be written as a bare class name instead of {name: ..., kwargs: ...}.
_NAMED_COMPONENT_LISTS = ('algorithms', 'loggers')


class RecipeError(ValueError):
    """A recipe that cannot run, with every problem found.

    Args:
        source (str): The recipe's name or path.
        problems (Sequence[str]): One line per problem, each starting with the dotted key it concerns.
    """

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        count = f'{len(self.problems)} problem' + ('s' if len(self.problems) != 1 else '')
        lines = '\n'.join(f'  - {p}' for p in self.problems)
        super().__init__(f'Recipe {source} cannot run ({count}; nothing was trained):\n{lines}')


class Problems(list):
    """The problems found in a recipe so far, each a line ``'<dotted key>: <what is wrong>'``.

    Example:
        .. testcode::

            from composer_kd.recipes.loader import Problems

            problems = Problems()
            problems.add('optimizer.lr', 'expected a learning rate > 0, got 0.0')
            assert problems == ['optimizer.lr: expected a learning rate > 0, got 0.0']
    """

    def add(self, key: str, message: str) -> None:
        """Note a problem of the recipe key ``key``."""
        self.append(f'{key}: {message}')


def nearest(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name``, or ``''`` when none is close.

    :func:`composer_kd.options.did_you_mean`, with the looser cutoff (``0.5``) that a recipe's names take: short
    names of datasets, devices and backends are often misspelled by a larger share of their letters.

    Args:
        name (str): A name that is not known.
        known (Iterable[str]): The names that are.

    Returns:
        str: The hint, to append to a problem.

    Example:
        .. testcode::

            from composer_kd.recipes.loader import nearest

            assert nearest('digitz', ['digits', 'glue']) == "; did you mean 'digits'?"
            assert nearest('Adamw', ['Adam', 'AdamW']) == "; did you mean 'AdamW'?"  # case counts least
    """
    return did_you_mean(name, known, cutoff=0.5)


def builtin_recipes() -> dict[str, str]:
    """The recipes shipped inside the package: ``{name: path}``, sorted by name."""
    folder = resources.files('composer_kd.recipes')
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith('.yaml'):
            found[entry.name[: -len('.yaml')]] = str(entry)
    return dict(sorted(found.items()))


def resolve_recipe_source(source: Union[str, os.PathLike]) -> str:
    """The YAML file ``source`` names: a path to a file, or the name of a built-in recipe.

    Raises:
        RecipeError: If it is neither (the message says where it looked and lists the built-in names).
    """
    path = os.path.expanduser(os.fspath(source))
    if os.path.isfile(path):
        return path
    builtin = builtin_recipes()
    name = os.path.basename(path)[:-5] if path.endswith('.yaml') and os.sep not in path else path
    if name in builtin:
        return builtin[name]
    hint = did_you_mean(name, builtin).replace('did you mean ', 'did you mean the built-in recipe ', 1)
    raise RecipeError(
        str(source),
        [
            f'recipe: no file at {os.path.abspath(path)} and no built-in recipe named {name!r} '
            f'(built-in: {", ".join(builtin)}){hint}'
        ],
    )


def _describe(hint: Any) -> str:
    """What a type hint expects, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        described = [_describe(a) for a in args if a is not type(None)]
        return ' or '.join(described + (['null'] if type(None) in args else []))
    if origin in (list, Sequence):
        if dataclasses.is_dataclass(args[0]):
            return f'a list of sections with keys {", ".join(f.name for f in dataclasses.fields(args[0]))}'
        return f'a list of {_describe(args[0]).removeprefix("a ").removeprefix("an ")}s'
    if origin in (dict, Mapping):
        return 'a mapping'
    if dataclasses.is_dataclass(hint):
        return f'a section with keys {", ".join(f.name for f in dataclasses.fields(hint))}'
    return {int: 'an integer', float: 'a number', str: 'a string', bool: 'true or false'}.get(hint, str(hint))


def _shown(value: Any) -> str:
    kind = {bool: 'a boolean', int: 'an integer', float: 'a number', str: 'a string', list: 'a list', dict: 'a mapping'}
    return f'{value!r} ({kind.get(type(value), type(value).__name__)})'


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


def _check(value: Any, hint: Any, key: str, problems: list[str], complete: bool = True) -> None:
    """Walk ``value`` against the type ``hint``, appending a message for every unknown key and wrong type.

    With ``complete=False`` (a partial section, such as overrides) required keys may be absent.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin is Union:
        members = [a for a in args if a is not type(None)]
        if value is None:
            if type(None) not in args:
                problems.append(f'{key}: expected {_describe(hint)}, got null')
            return
        if len(members) > 1:
            if not any(_fits(value, member) for member in members):
                problems.append(f'{key}: expected {_describe(hint)}, got {_shown(value)}')
            return
        hint = members[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            problems.append(f'{key}: expected {_describe(hint)}, got {_shown(value)}')
            return
        fields = {f.name: f for f in dataclasses.fields(hint)}
        hints = typing.get_type_hints(hint)
        prefix = f'{key}.' if key else ''
        for name, item in value.items():
            if name not in fields:
                suggestion = did_you_mean(name, fields, prefix=prefix) or _elsewhere(name, hint, prefix)
                problems.append(
                    f'{prefix}{name}: unknown key{suggestion} (the keys of {key or "a recipe"} are: '
                    f'{", ".join(fields)})'
                )
            else:
                _check(item, _field_hint(fields[name], hints[name], item), f'{prefix}{name}', problems, complete)
        for name, f in fields.items():
            if complete and _required(f) and name not in value:
                problems.append(f'{prefix}{name}: required, expected {_describe(hints[name])}')
        return
    if origin in (list, Sequence):
        if not isinstance(value, list):
            problems.append(f'{key}: expected {_describe(hint)}, got {_shown(value)}')
            return
        for i, item in enumerate(value):
            _check(item, args[0], f'{key}.{i}', problems, complete)
        return
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            problems.append(f'{key}: expected {_describe(hint)}, got {_shown(value)}')
            return
        for name, item in value.items():
            _check(item, args[1], f'{key}.{name}', problems, complete)
        return
    if value is None:
        problems.append(f'{key}: expected {_describe(hint)}, got null')
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        # Numbers are taken as strings where a string is expected (``start: 0.5`` is the fraction '0.5').
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
    }.get(hint, True)
    if not ok:
        problems.append(f'{key}: expected {_describe(hint)}, got {_shown(value)}')


def _section_keys(hint: Any, prefix: str, depth: int = 3) -> Iterator[str]:
    """The dotted keys of the sections under the section ``hint`` (a list's items as ``<key>.0``), ``depth`` deep."""
    if depth == 0 or not dataclasses.is_dataclass(hint):
        return
    hints = typing.get_type_hints(hint)
    for f in dataclasses.fields(hint):
        inner = hints[f.name]
        if typing.get_origin(inner) is Union:
            members = [a for a in typing.get_args(inner) if a is not type(None)]
            inner = members[0] if len(members) == 1 else inner
        item = f'{prefix}{f.name}'
        if typing.get_origin(inner) in (list, Sequence) and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            inner, item = typing.get_args(inner)[0], f'{item}.0'
        if dataclasses.is_dataclass(inner):
            for g in dataclasses.fields(inner):
                yield f'{item}.{g.name}'
            yield from _section_keys(inner, f'{item}.', depth - 1)


def _depth(key: str) -> int:
    return key.count('.')


def _elsewhere(name: str, hint: Any, prefix: str) -> str:
    """``"; did you mean 'distillation.temperature'?"`` for a key of a section inside ``hint`` named ``name``."""
    found = sorted((key for key in _section_keys(hint, prefix) if key.rsplit('.', 1)[-1] == name), key=_depth)
    if not found:
        return ''
    return '; did you mean ' + ' or '.join(f"'{key}'" for key in found[:3]) + '?'


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` throughout."""
    found: list[str] = []
    _check(value, hint, '', found)
    return not found


def _field_hint(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """The type ``value`` is checked against: the field's, or for an option section its option class's keys.

    The option class (and torch with it) is read only for a section the recipe sets.
    """
    section = f.metadata.get(SECTION)
    if section is None or value is None:
        return hint
    spec = section.spec()
    origin = typing.get_origin(hint)
    if origin is Union:
        return Optional[spec]
    return list[spec] if origin in (list, Sequence) else spec


def _converted(value: Any, hint: Any) -> Any:
    """A checked ``value`` in the type ``hint`` names (``1`` as ``1.0`` for a float, ``2`` as ``'2'`` for a string),
    with every key a section leaves out set to its default."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None or hint is Any:
        return value
    if origin is Union:
        member = next(a for a in args if a is not type(None) and _fits(value, a))
        return _converted(value, member)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        converted = {}
        for f in dataclasses.fields(hint):
            if f.name in value:
                converted[f.name] = _converted(value[f.name], hints[f.name])
            else:
                converted[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
        return converted
    if origin in (list, Sequence):
        return [_converted(item, args[0]) for item in value]
    if origin in (dict, Mapping):
        return {name: _converted(item, args[1]) for name, item in value.items()}
    if hint is float:
        return float(value)
    if hint is str:
        return str(value)
    return value


def _with_option_sections(value: Any, hint: Any) -> Any:
    """A checked recipe (plain containers) with each option section complete: every key of its option class, each
    value in its field's type.

    The recipe's schema keeps a section as a mapping (its keys are the option class's, not written in the schema),
    so OmegaConf, which converts the other sections' values, leaves these as they are.
    """
    if typing.get_origin(hint) is Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = members[0] if len(members) == 1 else hint
    if not (dataclasses.is_dataclass(hint) and isinstance(value, Mapping)):
        return value
    hints = typing.get_type_hints(hint)
    completed = dict(value)
    for f in dataclasses.fields(hint):
        if completed.get(f.name) is None:
            continue
        if SECTION in f.metadata:
            completed[f.name] = _converted(completed[f.name], _field_hint(f, hints[f.name], completed[f.name]))
        else:
            completed[f.name] = _with_option_sections(completed[f.name], hints[f.name])
    return completed


def _normalize(plain: dict) -> dict:
    """Accept the shorthand ``algorithms: [ChannelsLast]`` for ``algorithms: [{name: ChannelsLast}]`` (and so for
    image transforms)."""

    def named(entries: Any) -> Any:
        return [{'name': e} if isinstance(e, str) else e for e in entries] if isinstance(entries, list) else entries

    for section in _NAMED_COMPONENT_LISTS:
        if section in plain:
            plain[section] = named(plain[section])
    images = plain.get('data', {}).get('image_folder') if isinstance(plain.get('data'), dict) else None
    if isinstance(images, dict):
        for name in ('train_transforms', 'eval_transforms'):
            if name in images:
                images[name] = named(images[name])
    return plain


def _parse_override(item: str) -> tuple[str, Any]:
    if '=' not in item:
        raise ValueError(f'override {item!r}: expected key=value, e.g. distillation.temperature=2')
    key, _ = item.split('=', 1)
    key = key.strip()
    if not key:
        raise ValueError(f'override {item!r}: the key before "=" is empty')
    if '' in key.split('.'):
        written = '.'.join(part for part in key.split('.') if part)
        raise ValueError(
            f'override {item!r}: the key {key!r} has an empty part between dots; did you mean {written!r}?'
        )
    # OmegaConf parses the value as YAML does: 2 is an int, 5ep a string, [1, 2] a list, null None.
    parsed = OmegaConf.from_dotlist([f'value={item.split("=", 1)[1]}'])
    return key, OmegaConf.to_container(parsed, resolve=False)['value']  # type: ignore[index]


def read_recipe_config(source: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> tuple[str, DictConfig]:
    """Read a recipe's YAML and apply ``key=value`` overrides, without checking anything else.

    Returns:
        tuple[str, DictConfig]: The file read, and its configuration.
    """
    path = resolve_recipe_source(source)
    try:
        config = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come in several exception types
        raise RecipeError(str(source), [f'recipe: {path} is not valid YAML: {e}']) from e
    if not isinstance(config, DictConfig):
        raise RecipeError(str(source), [f'recipe: {path} must hold a mapping of keys, not a list'])
    problems = []
    for item in overrides:
        try:
            key, value = _parse_override(item)
            OmegaConf.update(config, key, value, merge=True, force_add=True)
        except (ValueError, OmegaConfBaseException) as e:
            problems.append(str(e).splitlines()[0] if isinstance(e, OmegaConfBaseException) else str(e))
    if problems:
        raise RecipeError(str(source), problems)
    return path, config


def load_recipe(source: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and check a recipe; refuse it, naming every bad key, before anything is built.

    This checks the recipe's shape: every key known, every value of the expected type, required keys
    present. What needs registries or the file system (model and dataset names, files) is checked by
    :func:`composer_kd.recipes.validate.check_recipe`, which :func:`composer_kd.recipes.build.build_run` runs.

    Args:
        source (str | os.PathLike): A YAML file, or the name of a built-in recipe (see :func:`builtin_recipes`).
        overrides (Sequence[str], optional): ``key=value`` items as OmegaConf dot-lists write them, e.g.
            ``distillation.temperature=2`` or ``teachers.0.checkpoint=teacher.pt``. Applied in order.

    Returns:
        Recipe: The recipe, every default filled in.

    Raises:
        RecipeError: Listing every problem, each with its dotted key.
    """
    path, config = read_recipe_config(source, overrides)
    label = str(source) if str(source) == path else f'{source} ({path})'
    try:
        plain = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, 'full_key', None) or 'recipe'
        raise RecipeError(label, [f'{key}: {str(e).splitlines()[0]}']) from e
    assert isinstance(plain, dict)
    plain = _normalize(plain)
    problems: list[str] = []
    _check(plain, Recipe, '', problems)
    # A teacher's data section overrides part of the recipe's: check its keys, not its completeness.
    for i, teacher in enumerate(plain.get('teachers') or []):
        training = teacher.get('train') if isinstance(teacher, Mapping) else None
        if isinstance(training, Mapping) and isinstance(training.get('data'), Mapping):
            _check(training['data'], DataSpec, f'teachers.{i}.train.data', problems, complete=False)
    if problems:
        raise RecipeError(label, problems)
    plain = _with_option_sections(plain, Recipe)
    try:
        recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Recipe), plain))
    except OmegaConfBaseException as e:  # what the walk above cannot foresee; named by OmegaConf's key
        key = getattr(e, 'full_key', None) or 'recipe'
        raise RecipeError(label, [f'{key}: {str(e).splitlines()[0]}']) from e
    assert isinstance(recipe, Recipe)
    return recipe


def teacher_data_spec(data: DataSpec, overrides: dict[str, Any]) -> DataSpec:
    """The recipe's ``data`` section with a teacher's ``train.data`` overrides applied.

    Args:
        data (DataSpec): The recipe's ``data`` section.
        overrides (dict[str, Any]): A teacher's ``train.data``: keys of ``data`` and their values for the
            teacher's training.

    Returns:
        DataSpec: A new section; ``data`` itself when there is no override.

    Raises:
        ValueError: If an override has the wrong type (the message names the key).

    Example:
        .. testcode::

            from composer_kd.recipes.loader import teacher_data_spec
            from composer_kd.recipes.schema import DataSpec

            spec = teacher_data_spec(DataSpec(name='digits'), {'digits': {'per_class': 5}})
            assert spec.digits.per_class == 5
    """
    if not overrides:
        return data
    try:
        merged = OmegaConf.merge(OmegaConf.structured(data), overrides)
        spec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f'{getattr(e, "full_key", "")}: {str(e).splitlines()[0]}') from e
    assert isinstance(spec, DataSpec)
    return spec
