"""The one table of options that do not combine, as ``Distillation`` applies it, and the one "did you mean"."""

from __future__ import annotations

import pytest
import torch

from composer_kd import Distillation, FeaturePair, Fused, OnPolicy, TeacherCache, TeacherInference
from composer_kd.options import (
    CONFLICTS,
    check_type,
    conflicts_among,
    did_you_mean,
    given_options,
    refuse_conflicts,
    refuse_unknown_keywords,
)
from composer_kd.signal import TeacherSignal

# How each name of the table is set on Distillation; 'tasks' and 'search' are recipe and distill() settings.
SETTINGS = {
    'n_teachers_to_sample': {'n_teachers_to_sample': 1},
    'feature_pairs': {'feature_pairs': [FeaturePair('0', '0')]},
    'teacher_cache': {'teacher_cache': TeacherCache()},
    'on_policy': {'on_policy': OnPolicy()},
    'fused': {'fused': True},
    "on_nonfinite_teacher='skip'": {'on_nonfinite_teacher': 'skip'},
    'teacher_inference compile': {'teacher_inference': TeacherInference(compile=True)},
    'student_logits_key': {'student_logits_key': 'logits'},
    'teachers=TeacherSignal(...)': {'teachers': TeacherSignal()},
}
DISTILLATION_ROWS = [c for c in CONFLICTS if c.first in SETTINGS and c.second in SETTINGS]


def test_the_table_names_only_known_settings_and_no_pair_twice():
    names = set(SETTINGS) | {'tasks', 'search'}
    assert all(c.first in names and c.second in names for c in CONFLICTS)
    pairs = [frozenset((c.first, c.second)) for c in CONFLICTS]
    assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize('conflict', DISTILLATION_ROWS, ids=lambda c: f'{c.first}+{c.second}')
def test_distillation_refuses_every_pair_of_the_table_with_its_message(conflict):
    arguments = {'teachers': [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)]}
    arguments.update(SETTINGS[conflict.first])
    arguments.update(SETTINGS[conflict.second])
    with pytest.raises(ValueError) as error:
        Distillation(**arguments)
    assert str(error.value) == conflict.message()
    assert given_options(**{k: v for k, v in arguments.items()}) >= {conflict.first, conflict.second}


def test_each_setting_alone_is_accepted_where_the_table_allows_it():
    alone = ['n_teachers_to_sample', 'feature_pairs', 'teacher_cache', "on_nonfinite_teacher='skip'"]
    for name in alone:
        Distillation(**{'teachers': [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)], **SETTINGS[name]})


def test_given_options_reads_values_not_names():
    assert given_options(fused=None, feature_pairs=(), teacher_cache=None, on_nonfinite_teacher='raise') == set()
    assert given_options(teachers=[torch.nn.Linear(2, 2)], teacher_inference=TeacherInference()) == set()
    assert given_options(teachers=TeacherSignal(), teacher_inference=TeacherInference(compile=True)) == {
        'teachers=TeacherSignal(...)',
        'teacher_inference compile',
    }
    assert conflicts_among({'fused', 'search'}) == []
    refuse_conflicts({'fused'})  # one option conflicts with nothing


def test_did_you_mean_is_one_hint_everywhere():
    assert did_you_mean('temprature', ['temperature', 'end']) == "; did you mean 'temperature'?"
    assert did_you_mean('Temperature', ['temperature']) == "; did you mean 'temperature'?"
    assert did_you_mean('digitz', ['digits'], prefix='data.') == "; did you mean 'data.digits'?"
    assert did_you_mean('zzz', ['kl', 'js']) == ''
    with pytest.raises(TypeError, match=r"^Distillation\(\) got an unexpected keyword argument 'fusd'; did you mean"):
        refuse_unknown_keywords('Distillation', ['fusd'], ['fused', 'name'])
    with pytest.raises(TypeError, match="did you mean 'fused'"):
        Distillation(torch.nn.Linear(2, 2), fusd=True)
    with pytest.raises(TypeError, match='teacher_cache must be a TeacherCache, got dict'):
        check_type('teacher_cache', {}, TeacherCache)
    with pytest.raises(TypeError, match='fused must be True, False, None or a Fused'):
        Distillation(torch.nn.Linear(2, 2), fused='yes')
    assert Distillation(torch.nn.Linear(2, 2), fused=True).fused == Fused()
