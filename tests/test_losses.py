"""The KL divergence loss against the formula written out in float64, and its numerical edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from composer_kd import KLDivergence, kl_divergence


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask=None) -> float:
    """T^2 * mean over positions of sum_c p_c (log p_c - log q_c), by explicit loops in float64."""
    s = student.double().reshape(-1, student.shape[-1]).tolist()
    t = teacher.double().reshape(-1, teacher.shape[-1]).tolist()
    keep = [True] * len(s) if mask is None else mask.reshape(-1).tolist()
    total, count = 0.0, 0
    for s_row, t_row, k in zip(s, t, keep, strict=True):
        if not k:
            continue
        zs = sum(math.exp(v / temperature) for v in s_row)
        zt = sum(math.exp(v / temperature) for v in t_row)
        for sv, tv in zip(s_row, t_row, strict=True):
            p = math.exp(tv / temperature) / zt
            q = math.exp(sv / temperature) / zs
            total += p * (math.log(p) - math.log(q))
        count += 1
    return temperature**2 * total / max(count, 1)


@pytest.mark.parametrize('temperature', [0.5, 1.0, 4.0, 10.0])
def test_kl_equals_formula(temperature):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 7, 5, generator=generator), torch.randn(2, 7, 5, generator=generator)
    expected = reference_kl(student, teacher, temperature)
    assert kl_divergence(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert KLDivergence(temperature)(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_kl_with_mask_averages_over_valid_positions_only():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 4, 6, generator=generator), torch.randn(3, 4, 6, generator=generator)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    expected = reference_kl(student, teacher, 2.0, mask)
    assert kl_divergence(student, teacher, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    # Whatever sits at masked positions cannot matter.
    garbage = student.clone()
    garbage[~mask] = 1e6
    assert kl_divergence(garbage, teacher, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-5)


def test_kl_gradient_equals_analytic_gradient():
    # d/ds of T^2 KL(p || softmax(s/T)) per row is T * (q - p); averaged over N rows, divided by N.
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(5, 3, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 3, generator=generator)
    temperature = 3.0
    kl_divergence(student, teacher, temperature).backward()
    p = F.softmax(teacher / temperature, dim=-1)
    q = F.softmax(student.detach() / temperature, dim=-1)
    torch.testing.assert_close(student.grad, temperature * (q - p) / 5)


def test_kl_matches_torch_kl_div_batchmean():
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)
    temperature = 4.0
    torch_kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1), reduction='batchmean'
    )
    assert kl_divergence(student, teacher, temperature).item() == pytest.approx(
        (torch_kl * temperature**2).item(), rel=1e-5
    )


def test_kl_is_zero_for_equal_inputs_and_positive_otherwise():
    logits = torch.randn(4, 9)
    assert kl_divergence(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(logits, logits + torch.randn(4, 9), 2.0).item() > 0


def test_kl_finite_for_huge_logits():
    student = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0]])
    loss = kl_divergence(student, teacher, 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


def test_kl_handles_minus_inf_masked_classes_without_nan():
    # Both models mask the same class (e.g. a vocabulary entry that may never be produced).
    student = torch.tensor([[0.5, -float('inf'), 1.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, -float('inf'), 0.2]])
    loss = kl_divergence(student, teacher, 2.0)
    loss.backward()
    expected = reference_kl(student.detach()[:, [0, 2]], teacher[:, [0, 2]], 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert not torch.isnan(student.grad).any()


def test_kl_in_low_precision_inputs_is_computed_in_float32():
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    loss = kl_divergence(student.bfloat16(), teacher.bfloat16(), 2.0)
    assert loss.dtype == torch.float32
    expected = reference_kl(student.bfloat16().float(), teacher.bfloat16().float(), 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_softmax_dim_selects_the_class_dimension():
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 3, generator=generator)
    # Classes on dim 1: the same as moving them last.
    expected = reference_kl(student.transpose(1, 2), teacher.transpose(1, 2), 1.5)
    assert kl_divergence(student, teacher, 1.5, softmax_dim=1).item() == pytest.approx(expected, rel=1e-5)
    assert KLDivergence(1.5, softmax_dim=1)(student, teacher).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('temperature', [0.0, -1.0, float('nan')])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match='temperature must be > 0'):
        KLDivergence(temperature=temperature)
    with pytest.raises(ValueError, match='temperature must be > 0'):
        kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2), temperature)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r'\(2, 3\).*\(2, 4\)'):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))
