"""Recipes: a whole distillation run described in YAML, checked before it starts, run by Composer's ``Trainer``.

The YAML files in this folder are the built-in recipes (``composer-kd recipes`` lists them). A recipe is read
by :func:`load_recipe` (schema in :mod:`~composer_kd.recipes.schema`), checked against registries and the file
system by :func:`check_recipe`, built by :func:`build_run` and run by :meth:`RecipeRun.fit`:

.. code-block:: python

    from composer_kd.recipes import build_run, load_recipe

    recipe = load_recipe('digits', ['distillation.temperature=2', 'max_duration=100ba'])
    summary = build_run(recipe).fit()
"""

from composer_kd.recipes.build import (
    build_compression,
    build_distillation,
    build_run,
    build_student_alone,
    build_trainer,
    evaluate,
)
from composer_kd.recipes.loader import RecipeError, builtin_recipes, load_recipe, resolve_recipe_source
from composer_kd.recipes.run import ModelReport, RecipeRun, RunSummary, distillation_ratio
from composer_kd.recipes.schema import Recipe
from composer_kd.recipes.validate import check_recipe

__all__ = [
    'ModelReport',
    'Recipe',
    'RecipeError',
    'RecipeRun',
    'RunSummary',
    'build_compression',
    'build_distillation',
    'build_run',
    'build_student_alone',
    'build_trainer',
    'builtin_recipes',
    'check_recipe',
    'distillation_ratio',
    'evaluate',
    'load_recipe',
    'resolve_recipe_source',
]
