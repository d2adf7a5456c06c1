"""Settings chosen on validation: the grid, the choice (the best validation score), and the test split untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import composer_kd.run.api
from composer_kd import DecoupledKD, KLDivergence, distill
from composer_kd.run.reporting import format_summary
from composer_kd.run.search import Candidate, SearchSpec, run_search, search_spec

pytestmark = pytest.mark.usefixtures('one_thread')

DEFAULTS = dict(kd_loss='kl', temperature=None, kd_loss_weight=1.0, org_loss_weight=1.0, max_duration='8ba')


class Counted(Dataset):
    """A dataset that counts how often it is read."""

    def __init__(self, data: TensorDataset):
        self.data, self.reads = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        self.reads += 1
        return self.data[index]


def tiny_data(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long())


def tiny_teacher() -> nn.Module:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    data = tiny_data(256, 0)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(data.tensors[0]), data.tensors[1]).backward()
        optimizer.step()
    return teacher


def student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(8, 3)


def test_grid_is_the_product_in_order_and_keeps_unsearched_settings():
    spec = search_spec(
        {
            'kd_loss': ['kl', {'name': 'kl', 'standardize': True}, DecoupledKD(beta=2.0)],
            'temperature': [1.0, 4.0],
            'kd_loss_weight': [0.5, 1.0],
        },
        **DEFAULTS,
    )
    described = [c.describe() for c in spec.candidates]
    assert len(described) == 12 and len(set(described)) == 12
    assert described[0] == 'kl, T=1, kd weight 0.5, label weight 1'
    assert described[5] == 'kl(standardize=True), T=1, kd weight 1, label weight 1'
    assert described[-1] == 'DecoupledKD, T=4, kd weight 1, label weight 1'
    assert spec.max_duration == '8ba' and spec.split == 'val' and spec.metric is None
    dkd = spec.candidates[-1].loss()
    assert isinstance(dkd, DecoupledKD) and (dkd.temperature, dkd.beta) == (4.0, 2.0)
    assert dkd is not spec.candidates[-1].loss()  # a fresh copy for each candidate's fit
    # A loss without a temperature is tried once, whatever the temperatures.
    mse = search_spec({'kd_loss': ['mse'], 'temperature': [1.0, 2.0, 4.0]}, **DEFAULTS)
    assert [c.describe() for c in mse.candidates] == ['mse, kd weight 1, label weight 1']


@pytest.mark.parametrize(
    ('search', 'message'),
    [
        ({'temperatures': [1.0]}, "did you mean 'temperature'"),
        ({'split': 'test'}, 'never chosen on the test split'),
        ({'kd_loss': []}, 'empty'),
        ({'kd_loss': ['kld']}, "unknown loss 'kld'"),
        ({'kd_loss': [{'name': 'dkd', 'gamma': 1.0}]}, 'refused its settings'),
        ({'kd_loss': [{'standardize': True}]}, "needs its 'name'"),
        ({'temperature': [0.0]}, 'numbers > 0'),
        ({'kd_loss_weight': [-1.0]}, 'numbers >= 0'),
    ],
)
def test_bad_searches_are_refused(search, message):
    with pytest.raises(ValueError, match=message):
        search_spec(search, **DEFAULTS)


def test_the_best_validation_score_is_chosen_and_every_candidate_reported():
    spec = SearchSpec([Candidate('kl', t, w, 1.0) for t in (1.0, 2.0, 4.0) for w in (0.5, 1.0)], '8ba')
    made_up = {
        (1.0, 0.5): 0.70,
        (1.0, 1.0): 0.80,
        (2.0, 0.5): 0.90,
        (2.0, 1.0): 0.60,
        (4.0, 0.5): 0.90,
        (4.0, 1.0): 0.1,
    }
    scored = []

    def scorer(candidate: Candidate) -> tuple[float, str]:
        scored.append(candidate)
        return made_up[candidate.temperature, candidate.kd_loss_weight], 'accuracy'

    report = run_search(spec, scorer, reference=lambda: (0.75, 'accuracy'))
    assert scored == spec.candidates  # each scored once, in order
    assert report.chosen == 2 and report.best.temperature == 2.0  # a tie (0.90) goes to the first
    assert report.scores == [made_up[c.temperature, c.kd_loss_weight] for c in spec.candidates]
    assert [row['score'] for row in report.rows()] == report.scores
    assert [row['chosen'] for row in report.rows()] == [i == 2 for i in range(6)]
    text = str(report)
    assert all(c.describe() in text for c in spec.candidates) and text.count('<- chosen') == 1
    assert 'student alone, same budget: 75.00% on val' in text


def test_distill_chooses_on_validation_and_never_reads_the_test_split(monkeypatch):
    train, val, test = tiny_data(128, 1), Counted(tiny_data(96, 2)), Counted(tiny_data(96, 3))
    reads_during_search = {}
    real_run_search = composer_kd.run.api.run_search

    def instrumented(*args, **kwargs):
        before = (val.reads, test.reads)
        report = real_run_search(*args, **kwargs)
        reads_during_search['val'], reads_during_search['test'] = val.reads - before[0], test.reads - before[1]
        return report

    monkeypatch.setattr(composer_kd.run.api, 'run_search', instrumented)
    grid = {'kd_loss': ['kl', 'dkd'], 'temperature': [1.0, 4.0], 'kd_loss_weight': [0.2, 1.0], 'max_duration': '6ba'}
    options = dict(max_duration='12ba', batch_size=16, lr=0.05, device='cpu', seed=3, measure_speed=False)
    trained, report = distill(
        tiny_teacher(), student(), train, {'val': val, 'test': test}, search=grid, baseline=True, **options
    )
    search = report.search
    assert reads_during_search['test'] == 0  # the test split was not read while choosing
    assert reads_during_search['val'] == 9 * len(val)  # each of 8 candidates, and the student alone, once
    assert len(search.candidates) == 8 and search.split == 'val' and search.max_duration == '6ba'
    assert search.scores[search.chosen] == max(search.scores) and search.reference is not None
    assert report.split == 'test'  # the headline is a split the settings were not chosen on
    assert [m.role for m in report.models] == ['teacher 0', 'student (distilled)', 'student alone']
    summary = format_summary(report)
    assert all(c.describe() in summary for c in search.candidates)

    # Re-computed: the chosen candidate trained alone for the search's budget scores what the search recorded.
    best = search.best
    _, again = distill(
        tiny_teacher(),
        student(),
        train,
        {'val': tiny_data(96, 2)},
        kd_loss=best.loss(),
        temperature=best.temperature,
        kd_loss_weight=best.kd_loss_weight,
        org_loss_weight=best.org_loss_weight,
        **{**options, 'max_duration': '6ba'},
    )
    assert again.value('student (distilled)') == pytest.approx(search.scores[search.chosen], abs=1e-6)
    # And the final student was trained with the chosen settings and the full budget.
    _, final = distill(
        tiny_teacher(),
        student(),
        train,
        {'test': tiny_data(96, 3)},
        kd_loss=best.loss(),
        temperature=best.temperature,
        kd_loss_weight=best.kd_loss_weight,
        org_loss_weight=best.org_loss_weight,
        **options,
    )
    assert final.value('student (distilled)') == pytest.approx(report.value('student (distilled)'), abs=1e-6)


def test_distill_search_refuses_what_it_cannot_do():
    train, val = tiny_data(32, 1), tiny_data(32, 2)
    common = dict(max_duration='1ba', device='cpu', measure_speed=False)
    with pytest.raises(ValueError, match="'val' is not an evaluation split"):
        distill(tiny_teacher(), student(), train, {'dev': val, 'test': val}, search={'kd_loss': ['kl']}, **common)
    with pytest.raises(ValueError, match='reported on another split'):
        distill(tiny_teacher(), student(), train, {'val': val}, search={'kd_loss': ['kl']}, **common)
    with pytest.raises(ValueError, match='never chosen on the test split'):
        distill(tiny_teacher(), student(), train, {'test': val}, search={'split': 'test'}, **common)
    with pytest.raises(TypeError, match='search must be a mapping'):
        distill(tiny_teacher(), student(), train, {'val': val, 'test': val}, search=['kl'], **common)
    loss = KLDivergence()
    _, report = distill(
        tiny_teacher(), student(), train, {'dev': val, 'test': val}, kd_loss=loss, search={'split': 'dev'}, **common
    )
    assert [c.describe() for c in report.search.candidates] == ['KLDivergence, kd weight 1, label weight 1']
