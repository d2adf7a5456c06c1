"""Checkpoints written by an earlier version of the package still resume, to the same weights.

``tests/data/legacy`` holds epoch-1 checkpoints of two-epoch runs written before the modules were reorganized
(feature projections with sampled teachers and schedules; an in-memory teacher cache), and the student's weights
at the end of each uninterrupted run. Resuming must reach those weights.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import TEST_DATA

HERE = str(TEST_DATA / 'legacy')
sys.path.insert(0, HERE)

from make_checkpoints import SETUPS, mlp, student_state, trainer  # noqa: E402


@pytest.mark.parametrize('setup', sorted(SETUPS))
def test_legacy_checkpoint_resumes_to_the_uninterrupted_weights(setup, tmp_path):
    expected = torch.load(os.path.join(HERE, f'{setup}_expected.pt'), weights_only=True)
    teachers = [mlp(16, seed=1), mlp(12, seed=2)]
    for teacher, weights in zip(teachers, expected['teachers'], strict=True):
        teacher.load_state_dict(weights)
    resumed = trainer(setup, teachers, str(tmp_path), load_path=os.path.join(HERE, f'{setup}_ep1.pt'))
    assert int(resumed.state.timestamp.epoch) == 1  # the checkpoint was read, not ignored
    resumed.fit()
    resumed.close()
    final = student_state(resumed)
    assert final.keys() == expected['final'].keys()
    for key, value in expected['final'].items():
        torch.testing.assert_close(final[key], value, rtol=1e-6, atol=1e-7, msg=key)
