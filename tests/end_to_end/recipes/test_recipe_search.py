"""A recipe's ``search`` section: candidates scored on the validation split only, the best trained and reported."""

from __future__ import annotations

import pytest
import torch

import composer_kd.recipes.run
from composer_kd import DecoupledKD, Distillation, Standardized
from composer_kd.recipes import RecipeError, build_run, check_recipe, load_recipe
from composer_kd.recipes.run import recipe_search, with_settings
from composer_kd.run.search import Candidate

GRID = (
    'search={losses: [{name: kl}, {name: dkd, options: {beta: 2}}, {name: kl, options: {standardize: true}}], '
    'temperatures: [2, 4], kd_loss_weights: [1], max_duration: 6ba}'
)
pytestmark = pytest.mark.usefixtures('one_thread')

FULL_LABELS = [
    'data.digits.per_class=null',
    'data.eval_splits=[val,test]',
    'progress_bar=false',
    'device=cpu',
    'max_duration=12ba',
    'eval_interval=6ba',
    'teachers.0.train.max_duration=8ba',
]


def test_search_section_chooses_on_val_and_reports_on_test(monkeypatch):
    recipe = load_recipe('digits', [*FULL_LABELS, GRID])
    assert recipe_search(recipe)['kd_loss'] == ['kl', {'name': 'dkd', 'beta': 2}, {'name': 'kl', 'standardize': True}]
    run = build_run(recipe)
    loaders = []  # every evaluation loader asked for, with the phase it was asked for in
    phase = ['before']
    real_loader, real_search = run.data.eval_loader, composer_kd.recipes.run.run_search

    def eval_loader(split):
        loaders.append((phase[0], split))
        return real_loader(split)

    def search(*args, **kwargs):
        phase[0] = 'search'
        try:
            return real_search(*args, **kwargs)
        finally:
            phase[0] = 'after'

    monkeypatch.setattr(run.data, 'eval_loader', eval_loader)
    monkeypatch.setattr(composer_kd.recipes.run, 'run_search', search)
    summary = run.fit()
    searched = [split for when, split in loaders if when == 'search']
    assert searched == ['val'] * 7  # 6 candidates and the student alone, each evaluated once, on val only
    report = summary.search
    assert report is run.search and len(report.candidates) == 6 and report.max_duration == '6ba'
    assert report.scores[report.chosen] == max(report.scores) and report.reference is not None
    assert summary.split == 'test' and list(summary.models[1].metrics) == ['test', 'val']
    # The trained student is the chosen candidate's, trained with the recipe's full budget.
    distillation = next(a for a in run.trainer.state.algorithms if isinstance(a, Distillation))
    best = report.best
    expected = {'kl': 'KLDivergence', 'dkd': 'DecoupledKD'}
    name = best.kd_loss if isinstance(best.kd_loss, str) else best.kd_loss['name']
    loss = distillation.kd_loss_fn
    if isinstance(best.kd_loss, dict) and best.kd_loss.get('standardize'):
        assert isinstance(loss, Standardized)
        loss = loss.loss
    assert type(loss).__name__ == expected[name] and loss.temperature == best.temperature
    assert int(run.trainer.state.timestamp.batch) == 12
    text = str(summary)
    assert all(c.describe() in text for c in report.candidates)


def test_with_settings_and_dkd_from_a_recipe():
    recipe = load_recipe('digits', ['distillation.loss=dkd', 'distillation.loss_options={alpha: 0.5, beta: 2}'])
    assert check_recipe(recipe) == []
    from composer_kd.recipes.components import build_distillation

    loss = build_distillation(recipe, [torch.nn.Linear(64, 10)]).kd_loss_fn
    assert isinstance(loss, DecoupledKD) and (loss.alpha, loss.beta, loss.temperature) == (0.5, 2.0, 4.0)
    variant = with_settings(recipe, Candidate('kl', 2.0, 0.5, 0.5), '10ba')
    d = variant.distillation
    assert (d.loss, d.loss_options, d.temperature, d.kd_loss_weight, variant.max_duration) == (
        'kl',
        {},
        2.0,
        0.5,
        '10ba',
    )
    assert recipe.distillation.loss == 'dkd'  # the original is untouched


@pytest.mark.parametrize(
    ('overrides', 'message'),
    [
        (
            ['data.eval_splits=[val,test]', 'search={split: test}'],
            'search.split: settings are never chosen on the test',
        ),
        (['search={temperatures: [2]}'], 'data.eval_splits: with a search, name the split chosen on'),
        (['data.eval_splits=[val,test]', 'search={losses: [{name: kld}]}'], "search.losses.0.name: unknown loss 'kld'"),
        (
            ['data.eval_splits=[val,test]', 'search={losses: [{name: dkd, options: {gamma: 1}}]}'],
            'search.losses.0.options: dkd refused',
        ),
        (['data.eval_splits=[val,test]', 'search={temperatures: [0]}'], 'search.temperatures.0: expected a number > 0'),
        (['data.eval_splits=[val,test]', 'search={max_duration: soon}'], 'search.max_duration'),
        (['distillation.loss_options={gamma: 1}'], 'distillation.loss_options: kl refused'),
    ],
)
def test_bad_search_sections_are_refused_by_key(overrides, message):
    recipe = load_recipe('digits', overrides)
    with pytest.raises(RecipeError, match=message):
        build_run(recipe)
