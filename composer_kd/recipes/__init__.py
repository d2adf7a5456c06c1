"""Recipes: a whole distillation run described in YAML, checked before it starts, run by Composer's ``Trainer``.

The YAML files in this folder are the built-in recipes (``composer-kd recipes`` lists them). A recipe is read
by :func:`load_recipe` (schema in :mod:`~composer_kd.recipes.schema`), checked against registries and the file
system by :func:`check_recipe`, built by :func:`build_run` and run by :meth:`RecipeRun.fit`:

.. code-block:: python

    from composer_kd.recipes import build_run, load_recipe

    recipe = load_recipe('digits', ['distillation.temperature=2', 'max_duration=100ba'])
    summary = build_run(recipe).fit()

Its names are imported from their modules on first use, so ``composer-kd recipes`` lists the built-in recipes
without loading torch or Composer.
"""

from typing import TYPE_CHECKING

from composer_kd.lazy import lazy_exports

if TYPE_CHECKING:  # the names as type checkers and editors see them
    from composer_kd.recipes.build import build_run
    from composer_kd.recipes.components import build_compression, build_distillation
    from composer_kd.recipes.loader import RecipeError, builtin_recipes, load_recipe, resolve_recipe_source
    from composer_kd.recipes.run import RecipeRun
    from composer_kd.recipes.schema import Recipe
    from composer_kd.recipes.trainers import build_student_alone, build_trainer, evaluate
    from composer_kd.recipes.validate import check_recipe
    from composer_kd.run.reporting import ModelReport, RunSummary, distillation_ratio

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

_EXPORTED_FROM = {
    'composer_kd.recipes.build': ('build_run',),
    'composer_kd.recipes.components': ('build_compression', 'build_distillation'),
    'composer_kd.recipes.loader': ('RecipeError', 'builtin_recipes', 'load_recipe', 'resolve_recipe_source'),
    'composer_kd.recipes.run': ('RecipeRun',),
    'composer_kd.recipes.schema': ('Recipe',),
    'composer_kd.recipes.trainers': ('build_student_alone', 'build_trainer', 'evaluate'),
    'composer_kd.recipes.validate': ('check_recipe',),
    'composer_kd.run.reporting': ('ModelReport', 'RunSummary', 'distillation_ratio'),
}
#: Where each exported name lives: ``{name: module}``.
EXPORTS = {name: module for module, names in _EXPORTED_FROM.items() for name in names}

__getattr__, __dir__ = lazy_exports(__name__, EXPORTS, globals())
