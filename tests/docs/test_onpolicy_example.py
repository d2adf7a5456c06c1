"""examples/onpolicy_distillation.py runs end to end in a tiny setting, and its batches and figures are what it says."""

from __future__ import annotations

import math

import pytest
from test_examples import load_example


@pytest.fixture(scope='module')
def example():
    return load_example('onpolicy_distillation')


def test_batches_carry_prompts_that_never_cover_a_whole_row(example):
    batch = example.with_prompts(16)([list(range(40)), list(range(10))])
    assert batch['prompt_length'].tolist() == [16, 5]
    assert batch['labels'][1, 10:].tolist() == [-100] * 30


def test_a_tiny_run_compares_every_method(example, one_thread):
    tiny = '--seeds 0 --teacher-steps 3 --student-steps 4 --max-train-sequences 32 --max-eval-sequences 6'
    results = example.main([*tiny.split(), '--new-tokens', '4', '--device', 'cpu'])
    assert set(results['summary']) == set(example.METHODS)
    for method, (run,) in results['runs'].items():
        assert math.isfinite(run['perplexity']) and run['perplexity'] > 1, method
        assert 0 < run['teacher_nll_of_samples'] < math.log(257) + 5, method
        assert run['step_seconds'] > 0
        # Generation starts half-way (--generate-from 0.5): only the methods that generate spent time on it.
        assert (run['generation_seconds'] > 0) == (method != 'off-policy'), method
    assert results['summary']['off-policy']['step_time_ratio'][0] == pytest.approx(1.0)
