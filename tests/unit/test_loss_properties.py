"""Properties every loss must keep, on generated shapes, temperatures, masks and extreme logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from composer_kd import (
    cosine_distance,
    jensen_shannon_divergence,
    kl_divergence,
    logits_mse,
    reverse_kl_divergence,
    soft_cross_entropy,
)
from composer_kd.models.outputs import poisoned_rows

DIVERGENCES = {'kl': kl_divergence, 'reverse_kl': reverse_kl_divergence, 'js': jensen_shannon_divergence}
DISTRIBUTION_LOSSES = {**DIVERGENCES, 'soft_ce': soft_cross_entropy}


@st.composite
def logit_pairs(draw, extreme: bool = True):
    """Student/teacher logits [batch, seq, classes], a mask over [batch, seq], and a temperature."""
    batch, seq, classes = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6))
    bound = 1e4 if extreme else 30.0
    values = st.floats(-bound, bound, allow_nan=False, width=32)
    shape = (batch, seq, classes)

    def tensor():
        return torch.tensor(draw(st.lists(values, min_size=batch * seq * classes, max_size=batch * seq * classes)))

    student, teacher = tensor().reshape(shape), tensor().reshape(shape)
    if extreme and classes > 2 and draw(st.booleans()):
        # A class both models rule out entirely (a masked vocabulary entry).
        student[..., 0] = -float('inf')
        teacher[..., 0] = -float('inf')
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))).reshape(batch, seq)
    temperature = draw(st.floats(0.1, 20.0))
    return student, teacher, mask, temperature


@pytest.mark.parametrize('name', sorted(DISTRIBUTION_LOSSES))
@settings(max_examples=40, deadline=None)
@given(case=logit_pairs())
def test_finite_value_and_gradient_everywhere(name, case):
    student, teacher, mask, temperature = case
    student = student.clone().requires_grad_()
    loss = DISTRIBUTION_LOSSES[name](student, teacher, temperature, mask=mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert not torch.isnan(student.grad).any()


@pytest.mark.parametrize('name', sorted(DIVERGENCES))
@settings(max_examples=40, deadline=None)
@given(case=logit_pairs(extreme=False))
def test_divergences_are_nonnegative_and_zero_for_equal_inputs(name, case):
    student, teacher, mask, temperature = case
    divergence = DIVERGENCES[name]
    assert divergence(student, teacher, temperature, mask=mask).item() >= -1e-5 * temperature**2
    assert divergence(teacher, teacher.clone(), temperature, mask=mask).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize('name', sorted(DISTRIBUTION_LOSSES) + ['mse', 'cosine'])
@settings(max_examples=40, deadline=None)
@given(case=logit_pairs(extreme=False), noise=st.floats(-1e3, 1e3))
def test_padded_positions_never_matter(name, case, noise):
    student, teacher, mask, temperature = case
    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[~mask] += noise
    changed_teacher[~mask] -= noise

    def loss(s, t):
        if name == 'mse':
            return logits_mse(s, t, mask)
        if name == 'cosine':
            return cosine_distance(s, t, mask)
        return DISTRIBUTION_LOSSES[name](s, t, temperature, mask=mask)

    assert loss(changed_student, changed_teacher).item() == pytest.approx(
        loss(student, teacher).item(), rel=1e-5, abs=1e-6
    )


@pytest.mark.parametrize('name', sorted(DISTRIBUTION_LOSSES))
@settings(max_examples=30, deadline=None)
@given(case=logit_pairs(extreme=False))
def test_an_all_true_mask_is_no_mask(name, case):
    student, teacher, _, temperature = case
    everything = torch.ones(student.shape[:-1], dtype=torch.bool)
    loss = DISTRIBUTION_LOSSES[name]
    assert loss(student, teacher, temperature, mask=everything).item() == pytest.approx(
        loss(student, teacher, temperature).item(), rel=1e-5, abs=1e-6
    )


@settings(max_examples=30, deadline=None)
@given(case=logit_pairs(extreme=False))
def test_soft_cross_entropy_is_at_least_kl(case):
    student, teacher, mask, temperature = case
    # Their difference is the teacher's entropy (times T^2), never negative.
    difference = soft_cross_entropy(student, teacher, temperature, mask=mask) - kl_divergence(
        student, teacher, temperature, mask=mask
    )
    assert difference.item() >= -1e-4 * temperature**2


@st.composite
def logits_with_nonfinite_values(draw):
    """Logits of 1 to 3 dimensions mixing finite values, NaN, +inf and -inf, possibly non-contiguous."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    n = int(torch.tensor(shape).prod())
    values = st.sampled_from([0.0, -3.5, 1e30, -1e30, float('nan'), float('inf'), -float('inf')])
    logits = torch.tensor(draw(st.lists(values, min_size=n, max_size=n))).reshape(shape)
    logits = logits.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))
    if logits.dim() == 3 and draw(st.booleans()):
        logits = logits.transpose(1, 2)  # a view whose memory is not in row order
    return logits


@settings(max_examples=80, deadline=None)
@given(logits=logits_with_nonfinite_values())
def test_poisoned_rows_matches_the_elementwise_definition(logits):
    expected = (torch.isnan(logits) | torch.isposinf(logits)).reshape(logits.shape[0], -1).any(dim=1)
    assert torch.equal(poisoned_rows(logits), expected)
