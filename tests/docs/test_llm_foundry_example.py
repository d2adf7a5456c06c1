"""The llm-foundry example, tiny: llm-foundry's own train entry point trains a teacher, then the student alone and
distilled at the same token budget, and the report it writes is consistent with itself and with the docs page."""

from __future__ import annotations

import json
import math

import pytest
from conftest import DOCS, EXAMPLES, ROOT, run_script
from omegaconf import OmegaConf

pytest.importorskip('llmfoundry')

FOLDER = EXAMPLES / 'llm_foundry'


@pytest.fixture(scope='module')
def tiny_report(tmp_path_factory) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp('llm_foundry')
    run_script(FOLDER / 'distill_llm.py', '--tiny', '--output-dir', str(out), timeout=600)
    return json.loads((out / 'report.json').read_text()), out


def test_the_tiny_run_reports_every_model_on_held_out_text(tiny_report):
    report, out = tiny_report
    (run,) = report['runs']
    for role in ('teacher', 'alone', 'distilled'):
        assert math.isfinite(run[role]['perplexity']) and run[role]['perplexity'] > 1
        assert run[role]['perplexity'] == pytest.approx(math.exp(run[role]['cross_entropy']), rel=1e-4)
    # The same student, the same token budget; only the distilled run has a distillation term.
    assert run['alone']['tokens_seen'] == run['distilled']['tokens_seen'] > 0
    assert run['alone']['parameters'] == run['distilled']['parameters'] < run['teacher']['parameters']
    assert 'loss/kd' in run['distilled'] and 'loss/kd' not in run['alone']
    summary = report['summary']
    teacher, alone, distilled = (summary[r]['perplexity_mean'] for r in ('teacher', 'alone', 'distilled'))
    ratio = summary['distillation_ratio']
    if teacher < alone:
        assert ratio == pytest.approx((alone - distilled) / (alone - teacher))
    else:  # a few steps need not make the teacher better: the ratio is then undefined
        assert ratio is None
    assert report['split_tokens']['train'] > report['split_tokens']['heldout'] > 0
    assert (out / 'data' / 'train' / 'index.json').is_file()  # MDS shards, as Streaming writes them


def test_the_distilled_runs_yaml_is_a_stock_llm_foundry_yaml_with_the_algorithm(tiny_report):
    _, out = tiny_report
    config = OmegaConf.load(out / 'yaml' / 'student_distilled.yaml')
    (teacher,) = config.algorithms.distillation.teachers
    assert teacher.name == 'mpt_causal_lm' and 'load_path' in teacher
    assert 'algorithms' not in OmegaConf.load(out / 'yaml' / 'student_alone.yaml')


def test_the_docs_page_shows_the_examples_yaml_and_is_in_the_toctree():
    page = (DOCS / 'llm_foundry.md').read_text()
    for name in ('teacher.yaml', 'student.yaml', 'distillation.yaml'):
        assert f'../examples/llm_foundry/{name}' in page
    assert 'llm_foundry' in (DOCS / 'index.md').read_text()
    assert 'llm-foundry' in (ROOT / 'README.md').read_text()
