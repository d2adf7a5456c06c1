"""The KL divergence loss against the formula written out in float64, and its numerical edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from composer_kd import (
    CosineDistance,
    JensenShannonDivergence,
    KLDivergence,
    LogitsMSE,
    ReverseKLDivergence,
    SoftCrossEntropy,
    chunked_kl_divergence,
    cosine_distance,
    get_loss,
    jensen_shannon_divergence,
    kl_divergence,
    logits_mse,
    reverse_kl_divergence,
    soft_cross_entropy,
)


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


def softmax_rows(logits: torch.Tensor, temperature: float) -> list[list[float]]:
    rows = []
    for row in logits.double().reshape(-1, logits.shape[-1]).tolist():
        z = sum(math.exp(v / temperature) for v in row)
        rows.append([math.exp(v / temperature) / z for v in row])
    return rows


def mean_over_rows(values: list[float], mask) -> float:
    keep = [True] * len(values) if mask is None else mask.reshape(-1).tolist()
    kept = [v for v, k in zip(values, keep, strict=True) if k]
    return sum(kept) / len(kept)


def reference(name: str, student, teacher, temperature, mask=None) -> float:
    """Each catalog loss written out row by row in float64."""
    if name in ('mse', 'cosine'):
        rows = []
        for s, t in zip(
            student.double().reshape(-1, student.shape[-1]).tolist(),
            teacher.double().reshape(-1, teacher.shape[-1]).tolist(),
            strict=True,
        ):
            if name == 'mse':
                rows.append(sum((a - b) ** 2 for a, b in zip(s, t, strict=True)) / len(s))
            else:
                dot = sum(a * b for a, b in zip(s, t, strict=True))
                rows.append(1 - dot / (math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(b * b for b in t))))
        return mean_over_rows(rows, mask)
    rows = []
    for q, p in zip(softmax_rows(student, temperature), softmax_rows(teacher, temperature), strict=True):
        if name == 'kl':
            value = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        elif name == 'reverse_kl':
            value = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
        elif name == 'js':
            m = [(pi + qi) / 2 for pi, qi in zip(p, q, strict=True)]
            value = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m, strict=True)) + 0.5 * sum(
                qi * math.log(qi / mi) for qi, mi in zip(q, m, strict=True)
            )
        else:  # soft_ce
            value = -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True))
        rows.append(temperature**2 * value)
    return mean_over_rows(rows, mask)


CATALOG = {
    'kl': (kl_divergence, KLDivergence),
    'reverse_kl': (reverse_kl_divergence, ReverseKLDivergence),
    'js': (jensen_shannon_divergence, JensenShannonDivergence),
    'soft_ce': (soft_cross_entropy, SoftCrossEntropy),
}


@pytest.mark.parametrize('name', sorted(CATALOG))
@pytest.mark.parametrize('use_mask', [False, True])
def test_distribution_losses_equal_their_formulas(name, use_mask):
    generator = torch.Generator().manual_seed(10)
    student, teacher = torch.randn(3, 4, 6, generator=generator) * 3, torch.randn(3, 4, 6, generator=generator) * 3
    mask = torch.rand(3, 4, generator=generator) > 0.4 if use_mask else None
    function, module = CATALOG[name]
    expected = reference(name, student, teacher, 2.5, mask)
    assert function(student, teacher, 2.5, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    assert module(temperature=2.5)(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)
    assert get_loss(name, temperature=2.5)(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ('name', 'function', 'module'), [('mse', logits_mse, LogitsMSE), ('cosine', cosine_distance, CosineDistance)]
)
@pytest.mark.parametrize('use_mask', [False, True])
def test_value_losses_equal_their_formulas(name, function, module, use_mask):
    generator = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    mask = torch.rand(2, 5, generator=generator) > 0.5 if use_mask else None
    expected = reference(name, student, teacher, 1.0, mask)
    assert function(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)
    assert module()(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)


def test_mse_without_mask_is_torch_mse():
    student, teacher = torch.randn(4, 7), torch.randn(4, 7)
    assert logits_mse(student, teacher).item() == pytest.approx(F.mse_loss(student, teacher).item(), rel=1e-6)


def test_soft_cross_entropy_is_kl_plus_teacher_entropy_with_equal_gradients():
    generator = torch.Generator().manual_seed(12)
    teacher = torch.randn(5, 6, generator=generator)
    s1 = torch.randn(5, 6, generator=generator, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_()
    ce, kl = soft_cross_entropy(s1, teacher, 2.0), kl_divergence(s2, teacher, 2.0)
    p = torch.softmax(teacher / 2.0, -1)
    entropy = 4.0 * -(p * p.log()).sum(-1).mean()
    assert ce.item() == pytest.approx((kl + entropy).item(), rel=1e-5)
    ce.backward()
    kl.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_js_is_symmetric_and_bounded():
    a, b = torch.randn(6, 5) * 10, torch.randn(6, 5) * 10
    assert jensen_shannon_divergence(a, b).item() == pytest.approx(jensen_shannon_divergence(b, a).item(), rel=1e-5)
    assert jensen_shannon_divergence(a, b).item() <= math.log(2) + 1e-6


@pytest.mark.parametrize('name', sorted(CATALOG))
def test_distribution_losses_finite_for_extreme_and_masked_logits(name):
    student = torch.tensor([[1e4, -1e4, 0.0, -float('inf')]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0, -float('inf')]])
    loss = CATALOG[name][0](student, teacher, 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert not torch.isnan(student.grad).any()


def test_automm_names_and_unknown_names():
    assert isinstance(get_loss('mean_square_error'), LogitsMSE)
    assert isinstance(get_loss('cosine_distance'), CosineDistance)
    with pytest.raises(ValueError, match="Unknown loss 'hinge'.*'js'"):
        get_loss('hinge')


@pytest.mark.parametrize('chunk_size', [1, 7, 64, 1000, None])
@pytest.mark.parametrize('use_mask', [False, True])
def test_chunked_kl_equals_kl_in_value_and_gradient(chunk_size, use_mask):
    generator = torch.Generator().manual_seed(20)
    student = (torch.randn(3, 21, 50, generator=generator) * 4).requires_grad_()
    teacher = torch.randn(3, 21, 50, generator=generator) * 4
    teacher[..., 3] = -float('inf')  # a vocabulary entry the teacher never produces
    mask = torch.rand(3, 21, generator=generator) > 0.3 if use_mask else None
    chunked = chunked_kl_divergence(student, teacher, 2.0, mask, chunk_size=chunk_size)
    chunked.backward()
    chunked_grad, student.grad = student.grad.clone(), None
    naive = kl_divergence(student, teacher, 2.0, mask=mask)
    naive.backward()
    assert chunked.item() == pytest.approx(naive.item(), rel=1e-5)
    torch.testing.assert_close(chunked_grad, student.grad, rtol=1e-5, atol=1e-8)


def test_chunked_kl_gradient_is_scaled_by_the_upstream_weight_and_used_once():
    generator = torch.Generator().manual_seed(21)
    student = torch.randn(2, 9, 40, generator=generator).requires_grad_()
    teacher = torch.randn(2, 9, 40, generator=generator)
    weighted = 0.3 * chunked_kl_divergence(student, teacher, 3.0, chunk_size=4) + student.sum() * 0
    weighted.backward(retain_graph=True)
    # The gradient written out: 0.3 * T * (softmax(s/T) - softmax(t/T)) / n_positions.
    expected = 0.3 * 3.0 * (torch.softmax(student.detach() / 3.0, -1) - torch.softmax(teacher / 3.0, -1)) / 18
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(RuntimeError, match='one backward pass per forward pass'):
        weighted.backward()
    with torch.no_grad():
        assert chunked_kl_divergence(student, teacher, 3.0, chunk_size=4).item() == pytest.approx(
            kl_divergence(student, teacher, 3.0).item(), rel=1e-5
        )


def test_chunked_kl_keeps_the_logits_dtype_for_gradients():
    student = torch.randn(4, 9, 30).bfloat16().requires_grad_()
    teacher = torch.randn(4, 9, 30).bfloat16()
    loss = KLDivergence(temperature=2.0, chunk_size=5)(student, teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(kl_divergence(student, teacher, 2.0).item(), rel=1e-5)


def test_chunk_size_must_be_positive_and_last_dim():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer or 'auto'"):
        KLDivergence(chunk_size=0)
    with pytest.raises(ValueError, match='chunk_size must be a positive integer'):
        chunked_kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=-1)
    with pytest.raises(ValueError, match='softmax_dim=-1'):
        KLDivergence(softmax_dim=1, chunk_size=8)
    assert 'chunk_size=8' in repr(KLDivergence(chunk_size=8))
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    assert KLDivergence(2.0, chunk_size='auto')(s, t).item() == pytest.approx(kl_divergence(s, t, 2.0).item(), rel=1e-5)
