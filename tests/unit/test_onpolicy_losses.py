"""The divergences of on-policy distillation against their published formulas, written out here.

The generalized Jensen-Shannon divergence is compared with the formula of Generalized Knowledge Distillation as
Hugging Face TRL's ``GKDTrainer.generalized_jsd_loss`` computes it (``torch.nn.functional.kl_div`` with log
targets, ``reduction='batchmean'``: the sum over positions and classes divided by the number of valid
positions); the skew divergences with DistiLLM's ``skewed_forward_kl`` / ``skewed_reverse_kl``. This package
multiplies every softened loss by ``T ** 2``; the references do not, so the comparisons divide it out.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from composer_kd import (
    LOSSES,
    Distillation,
    GeneralizedJSD,
    SkewKLDivergence,
    SkewReverseKLDivergence,
    generalized_jsd,
    get_loss,
    jensen_shannon_divergence,
    kl_divergence,
    reverse_kl_divergence,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
)
from composer_kd.losses import loss_from_name


def gkd_reference(student, teacher, beta, temperature=1.0, labels=None):
    """GKD's beta-generalized JSD as TRL computes it (its convention at beta = 0 and 1), in float64."""
    s = F.log_softmax(student.double() / temperature, dim=-1)
    t = F.log_softmax(teacher.double() / temperature, dim=-1)
    if beta == 0:
        per_entry = F.kl_div(s, t, reduction='none', log_target=True)  # KL(teacher || student)
    elif beta == 1:
        per_entry = F.kl_div(t, s, reduction='none', log_target=True)  # KL(student || teacher)
    else:
        mixture = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture, t, reduction='none', log_target=True)
        kl_student = F.kl_div(mixture, s, reduction='none', log_target=True)
        per_entry = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        keep = labels != -100
        return per_entry[keep].sum() / keep.sum()
    return per_entry.sum() / (per_entry.shape[0] * per_entry.shape[1])


def distillm_reference(student, teacher, alpha, reverse, mask):
    """DistiLLM's skew divergences, in float64; the forward one as a KL (its code drops the teacher's entropy)."""
    p = F.softmax(teacher.double(), dim=-1)
    q = F.softmax(student.double(), dim=-1)
    if reverse:
        mixed = (1 - alpha) * p + alpha * q
        per_position = (q * (q.log() - mixed.log())).sum(-1)
    else:
        mixed = alpha * p + (1 - alpha) * q
        cross_entropy = -(p * mixed.log()).sum(-1)  # what skewed_forward_kl returns
        per_position = cross_entropy - (-(p * p.log()).sum(-1))  # minus the teacher's entropy: the KL
    return per_position[mask].sum() / mask.sum()


def logits(seed, shape=(3, 7, 50), scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=generator), scale * torch.randn(*shape, generator=generator)


def labels_with_ignored():
    labels = torch.arange(21).reshape(3, 7)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100  # nothing to learn from this row
    return labels


@pytest.mark.parametrize('beta', [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_generalized_jsd_equals_the_gkd_formula(beta, temperature):
    student, teacher = logits(0)
    labels = labels_with_ignored()
    mask = labels != -100
    for kept, given in ((None, None), (labels, mask)):
        expected = gkd_reference(student, teacher, beta, temperature, labels=kept).item()
        value = generalized_jsd(student, teacher, beta=beta, temperature=temperature, mask=given).item()
        assert value / temperature**2 == pytest.approx(expected, abs=1e-6)
        module = GeneralizedJSD(beta=beta, temperature=temperature)
        assert module(student, teacher, mask=given).item() / temperature**2 == pytest.approx(expected, abs=1e-6)


def test_generalized_jsd_endpoints_and_midpoint():
    student, teacher = logits(1)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0), kl_divergence(student, teacher))
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0), reverse_kl_divergence(student, teacher))
    torch.testing.assert_close(generalized_jsd(student, teacher, 0.5), jensen_shannon_divergence(student, teacher))
    # Inside (0, 1) the divergence vanishes towards both ends; divided by beta (1 - beta) it tends to the
    # forward (reverse) KL, the limits the endpoints stand for.
    student, teacher = logits(1, scale=1.0)
    small, large = 1e-3, 1 - 1e-3
    assert generalized_jsd(student, teacher, small).item() / small == pytest.approx(
        kl_divergence(student, teacher).item(), rel=1e-2
    )
    assert generalized_jsd(student, teacher, large).item() / (1 - large) == pytest.approx(
        reverse_kl_divergence(student, teacher).item(), rel=1e-2
    )


@pytest.mark.parametrize('alpha', [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize('reverse', [False, True])
def test_skew_divergences_equal_the_distillm_formulas(alpha, reverse):
    student, teacher = logits(2)
    mask = labels_with_ignored() != -100
    expected = distillm_reference(student, teacher, alpha, reverse, mask).item()
    function = skew_reverse_kl_divergence if reverse else skew_kl_divergence
    module = (SkewReverseKLDivergence if reverse else SkewKLDivergence)(alpha=alpha)
    assert function(student, teacher, alpha, mask=mask).item() == pytest.approx(expected, abs=1e-6)
    assert module(student, teacher, mask=mask).item() == pytest.approx(expected, abs=1e-6)
    # With the temperature, the value is T^2 times the formula on softened logits.
    softened = distillm_reference(student / 3.0, teacher / 3.0, alpha, reverse, mask).item()
    assert function(student, teacher, alpha, temperature=3.0, mask=mask).item() / 9 == pytest.approx(softened, abs=1e-6)


def test_skew_forward_kl_has_the_gradient_of_distillms_cross_entropy():
    student, teacher = logits(3, shape=(4, 12))
    ours = student.clone().requires_grad_(True)
    skew_kl_divergence(ours, teacher, 0.1).backward()
    theirs = student.clone().double().requires_grad_(True)
    p = F.softmax(teacher.double(), dim=-1)
    mixed = 0.1 * p + 0.9 * F.softmax(theirs, dim=-1)
    (-(p * mixed.log()).sum(-1).mean()).backward()
    torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-7, rtol=1e-5)


def test_skew_divergences_are_bounded_by_log_one_over_alpha():
    student, teacher = logits(4, scale=30.0)  # far apart: the plain KLs are large
    assert kl_divergence(student, teacher).item() > 20
    for function in (skew_kl_divergence, skew_reverse_kl_divergence):
        assert function(student, teacher, 0.1).item() <= math.log(10) + 1e-6


@pytest.mark.parametrize('name', ['gjsd', 'skew_kl', 'skew_reverse_kl'])
def test_masked_positions_do_not_matter_and_masked_classes_give_no_nan(name):
    student, teacher = logits(5)
    mask = labels_with_ignored() != -100
    loss_fn = get_loss(name, temperature=2.0)
    expected = loss_fn(student, teacher, mask=mask)
    garbage = student.clone()
    garbage[~mask] = float('nan')
    assert loss_fn(garbage, teacher, mask=mask).item() == pytest.approx(expected.item(), rel=1e-6)
    # Classes impossible for one or both models (-inf), huge logits, low precision: finite values and gradients.
    student = student.clone()
    student[..., 0] = -float('inf')
    teacher[..., 0] = -float('inf')
    teacher[..., 1] = -float('inf')
    student[..., 2] = 1e4
    student = student.bfloat16().requires_grad_(True)
    loss = loss_fn(student, teacher, mask=mask)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize('name', ['gjsd', 'skew_kl', 'skew_reverse_kl'])
def test_zero_for_equal_inputs_and_zero_without_valid_positions(name):
    student, teacher = logits(6)
    loss_fn = get_loss(name)
    assert loss_fn(student, student).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(student, teacher).item() > 0
    assert loss_fn(student, teacher, mask=torch.zeros(3, 7, dtype=torch.bool)).item() == 0.0


def test_names_temperature_and_bad_settings():
    assert LOSSES['gjsd'] is GeneralizedJSD
    assert LOSSES['skew_kl'] is SkewKLDivergence and LOSSES['skew_reverse_kl'] is SkewReverseKLDivergence
    assert get_loss('gjsd', beta=0.9).beta == 0.9
    assert loss_from_name('skew_kl', temperature=2.0).temperature == 2.0
    assert Distillation(torch.nn.Linear(2, 2), kd_loss_fn='gjsd').kd_loss_fn.beta == 0.5
    assert 'beta=0.3' in repr(GeneralizedJSD(beta=0.3))
    for bad in (-0.1, 1.5, float('nan'), True, '0.5'):
        with pytest.raises(ValueError, match=r'beta must be a number in \[0, 1\]'):
            GeneralizedJSD(beta=bad)
        with pytest.raises(ValueError, match='beta must be'):
            generalized_jsd(torch.zeros(1, 2), torch.zeros(1, 2), beta=bad)
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match=r'alpha must be a number in \[0, 1\)'):
            SkewKLDivergence(alpha=bad)
        with pytest.raises(ValueError, match=r'alpha must be a number in \[0, 1\)'):
            skew_reverse_kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2), alpha=bad)
    with pytest.raises(ValueError, match='temperature must be > 0'):
        GeneralizedJSD(temperature=0.0)
