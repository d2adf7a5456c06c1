"""A recipe's option sections (``distillation.on_policy``, ``distillation.feature_pairs``): every argument of the
option class can be written in YAML and reaches the object the recipe builds, values of the wrong type are named by
their key, and the options that do not combine are refused by ``composer_kd.options.CONFLICTS``."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Union

import pytest
import torch
from conftest import EXAMPLES
from omegaconf import OmegaConf

from composer_kd.options import CONFLICTS
from composer_kd.recipes import RecipeError, check_recipe, load_recipe
from composer_kd.recipes.components import build_distillation
from composer_kd.recipes.loader import resolve_recipe_source
from composer_kd.recipes.schema import option_sections

SECTIONS = option_sections()

# A value for each argument that differs from its default and that the class accepts. An argument missing here
# gets one made up from its type (see made_up); one the class then refuses needs an entry.
VALUES: dict[str, dict[str, Any]] = {
    'OnPolicy': {
        'fraction': 0.25,
        'source': 'teacher',
        'max_new_tokens': 7,
        'temperature': 0.5,
        'prompt_length_key': 'n_prompt',
        'prompt_mask_key': 'is_prompt',
        'pad_token_id': 3,
        'eos_token_id': [1, 2],
        'cache_teacher_sequences': True,
        'org_loss_on_student_samples': True,
    },
    'FeaturePair': {
        'student': '0',
        'teacher': '2',
        'loss': 'cosine',
        'weight': 0.25,
        'teacher_index': 1,
        'output_index': 1,
        'student_dim': 5,
        'teacher_dim': 7,
    },
}


def made_up(hint: Any, default: Any) -> Any:
    """A value of the recipe type ``hint`` other than ``default``."""
    if typing.get_origin(hint) is Union:
        return made_up(next(a for a in typing.get_args(hint) if a is not type(None)), default)
    if typing.get_origin(hint) is list:
        return [made_up(typing.get_args(hint)[0], None)]
    made = {bool: lambda: not default, int: lambda: (default or 0) + 3, float: lambda: (default or 0.0) + 0.25}
    made[str] = lambda: f'{default}_set'
    if hint not in made:
        pytest.fail(f'no value made up for a field of type {hint}: add one to VALUES')
    return made[hint]()


def init_fields(option_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(option_class) if f.init]


def written(key: str, section: Any) -> dict[str, Any]:
    """Every argument of the section's option class, set to a value other than its default."""
    spec = {f.name: f for f in dataclasses.fields(section.spec())}
    values = {}
    for f in init_fields(section.option_class()):
        default = f.default if f.default is not dataclasses.MISSING else None
        chosen = VALUES.get(section.name, {}).get(f.name)
        values[f.name] = chosen if chosen is not None else made_up(spec[f.name].type, default)
        assert values[f.name] != default, f'{key}.{f.name}: the test value is the default'
    return values


def recipe_with(tmp_path, key: str, value: Any) -> str:
    """The digits recipe as a YAML file, with ``key`` set to ``value``."""
    config = OmegaConf.load(resolve_recipe_source('digits'))
    OmegaConf.update(config, key, value, merge=False, force_add=True)
    path = tmp_path / 'recipe.yaml'
    OmegaConf.save(config, path)
    return str(path)


def built_options(distillation: Any, key: str) -> list[Any]:
    """The option objects the built ``Distillation`` holds for the section at ``key``."""
    found = getattr(distillation, key.rsplit('.', 1)[-1])
    return list(found) if isinstance(found, (list, tuple)) else [found]


@pytest.mark.parametrize('key', sorted(SECTIONS))
def test_every_argument_of_the_option_class_is_a_key_of_its_section(key):
    section = SECTIONS[key]
    keys = [f.name for f in dataclasses.fields(section.spec())]
    assert keys == [f.name for f in init_fields(section.option_class())], (
        f'{key}: an argument of {section.name} whose type YAML cannot hold is not a key; give it a type a recipe '
        'can write (see composer_kd.recipes.schema.recipe_type)'
    )


@pytest.mark.parametrize('key', sorted(SECTIONS))
def test_every_argument_written_in_yaml_reaches_the_built_object(tmp_path, key):
    section = SECTIONS[key]
    values = written(key, section)
    is_list = key == 'distillation.feature_pairs'
    recipe = load_recipe(recipe_with(tmp_path, key, [values] if is_list else values))
    teachers = [torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)]
    (built,) = built_options(build_distillation(recipe, teachers), key)
    assert isinstance(built, section.option_class())
    assert {name: getattr(built, name) for name in values} == values


def test_values_are_converted_to_the_types_of_the_arguments():
    recipe = load_recipe(
        'digits', ['distillation.on_policy.temperature=1', 'distillation.feature_pairs=[{student: 1, teacher: 2}]']
    )
    on_policy, (pair,) = recipe.distillation.on_policy, recipe.distillation.feature_pairs
    assert on_policy['temperature'] == 1.0 and isinstance(on_policy['temperature'], float)
    assert (pair['student'], pair['teacher'], pair['loss']) == ('1', '2', 'mse')  # the default filled in
    distillation = build_distillation(recipe, [torch.nn.Linear(64, 10)])
    assert isinstance(distillation.on_policy.temperature, float) and distillation.feature_pairs[0].student == '1'


@pytest.mark.parametrize(
    'override, expected',
    [
        (
            'distillation.on_policy.max_new_tokens=many',
            "distillation.on_policy.max_new_tokens: expected an integer, got 'many' (a string)",
        ),
        (
            'distillation.on_policy.eos_token_id=[a]',
            "distillation.on_policy.eos_token_id: expected an integer or a list of integers or null, got ['a']",
        ),
        (
            'distillation.on_policy.cache_teacher_sequences=maybe',
            "distillation.on_policy.cache_teacher_sequences: expected true or false, got 'maybe'",
        ),
        ('distillation.on_policy=3', 'distillation.on_policy: expected a section with keys fraction, source,'),
        (
            "distillation.feature_pairs=[{student: '1', teacher: '1', weight: heavy}]",
            "distillation.feature_pairs.0.weight: expected a number, got 'heavy' (a string)",
        ),
        (
            "distillation.feature_pairs=[{student: '1'}]",
            'distillation.feature_pairs.0.teacher: required, expected a string',
        ),
        (
            "distillation.feature_pairs=[{student: '1', teacher: '1', wieght: 2}]",
            "distillation.feature_pairs.0.wieght: unknown key; did you mean 'distillation.feature_pairs.0.weight'?",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_named_by_its_key(override, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe('digits', [override])
    assert expected in str(info.value)


def test_a_value_the_option_class_refuses_is_named_by_its_section():
    recipe = load_recipe('digits', ["distillation.feature_pairs=[{student: '1', teacher: '1', weight: -1}]"])
    assert 'distillation.feature_pairs.0: FeaturePair weight must be a number >= 0, got -1.0.' in check_recipe(recipe)


# How a recipe sets each option of CONFLICTS that recipes have, on the multi-task example (which sets tasks).
RECIPE_KEYS = {
    'feature_pairs': ("distillation.feature_pairs=[{student: '1', teacher: '1'}]",),
    'n_teachers_to_sample': ('distillation.n_teachers_to_sample=1',),
    'on_policy': ('distillation.on_policy={}',),
    'search': ('search={temperatures: [2]}', 'data.eval_splits=[val, test]'),
    'tasks': (),
}
RECIPE_CONFLICTS = [c for c in CONFLICTS if c.first in RECIPE_KEYS and c.second in RECIPE_KEYS]


def recipe_key(option: str) -> str:
    return option if option == 'search' else f'distillation.{option}'


def test_every_pair_a_recipe_can_set_is_in_the_table():
    assert {(c.first, c.second) for c in RECIPE_CONFLICTS} == {
        ('feature_pairs', 'tasks'),
        ('n_teachers_to_sample', 'tasks'),
        ('on_policy', 'tasks'),
        ('search', 'tasks'),
    }


@pytest.mark.parametrize('conflict', RECIPE_CONFLICTS, ids=lambda c: f'{c.first}-{c.second}')
def test_options_that_do_not_combine_are_refused_by_recipe_key_with_the_tables_reason(conflict):
    overrides = [*RECIPE_KEYS[conflict.first], *RECIPE_KEYS[conflict.second]]
    problems = check_recipe(load_recipe(str(EXAMPLES / 'digits_multitask.yaml'), overrides))
    expected = f'{recipe_key(conflict.first)}: cannot be combined with {recipe_key(conflict.second)}: {conflict.reason}'
    assert expected in problems
