"""The nearest known name, suggested by ``composer_kd.options.did_you_mean`` wherever a name is refused."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from torch import nn

from composer_kd.compression import prunable_modules
from composer_kd.losses import get_loss
from composer_kd.options import did_you_mean
from composer_kd.recipes.loader import RecipeError, nearest, resolve_recipe_source


def test_an_unknown_loss_lists_the_known_ones_and_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"Unknown loss 'kll'; known: \[.*'kl'.*\]\); did you mean 'kl'\?$"):
        get_loss('kll')
    with pytest.raises(ValueError, match=r"Unknown loss 'KL'.*; did you mean 'kl'\?$"):
        get_loss('KL')
    with pytest.raises(ValueError, match=r"Unknown loss 'hinge'; known: \[.*\]\)\.$"):
        get_loss('hinge')


def test_an_unknown_layer_to_prune_suggests_the_nearest():
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(4, 8), act=nn.ReLU(), out=nn.Linear(8, 2)))
    with pytest.raises(ValueError, match=r"modules\[0\]: the model has no module 'hiden'; did you mean 'hidden'\?"):
        prunable_modules(model, ['hiden'])
    with pytest.raises(ValueError, match=r"no module 'zzz' \(its Linear and Conv layers: hidden, out\)"):
        prunable_modules(model, ['zzz'])


def test_the_recipes_take_the_looser_cutoff():
    assert did_you_mean('synth', ['synthetic_text', 'digits']) == ''
    assert nearest('synth', ['synthetic_text', 'digits']) == "; did you mean 'synthetic_text'?"
    assert nearest('Adamw', ['Adam', 'AdamW']) == did_you_mean('Adamw', ['Adam', 'AdamW']) == "; did you mean 'AdamW'?"
    assert nearest('zzzz', ['digits']) == ''


def test_an_unknown_built_in_recipe_suggests_the_nearest():
    with pytest.raises(RecipeError, match="did you mean the built-in recipe 'digits'"):
        resolve_recipe_source('digitz')
