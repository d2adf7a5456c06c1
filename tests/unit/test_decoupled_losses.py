"""Decoupled KD and logit standardization against their formulas written out in float64, and their edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from composer_kd import (
    LOSSES,
    DecoupledKD,
    KLDivergence,
    Standardized,
    decoupled_kd,
    get_loss,
    kl_divergence,
    standardize_logits,
)


def softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    exps = [math.exp((v - top) / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def reference_dkd(student, teacher, labels, temperature, alpha, beta, keep=None) -> float:
    """Zhao et al. (2022), Eq. 1-7, by explicit loops in float64: T^2 (alpha TCKD + beta NCKD), averaged."""
    s_rows = student.double().reshape(-1, student.shape[-1]).tolist()
    t_rows = teacher.double().reshape(-1, teacher.shape[-1]).tolist()
    ys = labels.reshape(-1).tolist()
    keep = [True] * len(ys) if keep is None else keep.reshape(-1).tolist()
    total, count = 0.0, 0
    for s_row, t_row, y, k in zip(s_rows, t_rows, ys, keep, strict=True):
        if not k or y == -100:
            continue
        p, q = softmax(t_row, temperature), softmax(s_row, temperature)
        tckd = kl([p[y], 1 - p[y]], [q[y], 1 - q[y]])
        p_hat = [p[j] / (1 - p[y]) for j in range(len(p)) if j != y]
        q_hat = [q[j] / (1 - q[y]) for j in range(len(q)) if j != y]
        nckd = kl(p_hat, q_hat)
        total += temperature**2 * (alpha * tckd + beta * nckd)
        count += 1
    return total / max(count, 1)


def reference_standardize(row: list[float]) -> list[float]:
    """Sun et al. (2024): (z - mean) / std, the std over K (not K - 1)."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))
    return [(v - mean) / std for v in row]


@pytest.mark.parametrize(('temperature', 'alpha', 'beta'), [(1.0, 1.0, 8.0), (4.0, 1.0, 8.0), (2.0, 0.5, 0.5)])
def test_dkd_equals_formula(temperature, alpha, beta):
    generator = torch.Generator().manual_seed(0)
    student, teacher = 3 * torch.randn(16, 7, generator=generator), 3 * torch.randn(16, 7, generator=generator)
    labels = torch.randint(0, 7, (16,), generator=generator)
    expected = reference_dkd(student, teacher, labels, temperature, alpha, beta)
    assert decoupled_kd(student, teacher, labels, temperature, alpha, beta).item() == pytest.approx(expected, rel=1e-5)
    module = DecoupledKD(temperature, alpha, beta)
    assert module(student, teacher, labels=labels).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_tckd_plus_weighted_nckd():
    """The paper's reformulation: KD = TCKD + (1 - p_y) NCKD, per example."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    labels = torch.randint(0, 5, (6,), generator=generator)
    for i in range(6):
        s, t, y = student[i : i + 1], teacher[i : i + 1], labels[i : i + 1]
        tckd = decoupled_kd(s, t, y, temperature=2.0, alpha=1.0, beta=0.0)
        nckd = decoupled_kd(s, t, y, temperature=2.0, alpha=0.0, beta=1.0)
        p_y = torch.softmax(t / 2.0, dim=-1)[0, y]
        assert torch.isclose(kl_divergence(s, t, 2.0), tckd + (1 - p_y) * nckd, rtol=1e-5)


def test_dkd_token_logits_with_ignored_labels_and_mask():
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[0, 3:] = -100
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 0] = False
    expected = reference_dkd(student, teacher, labels, 3.0, 1.0, 2.0, keep=mask)
    assert decoupled_kd(student, teacher, labels, 3.0, 1.0, 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-5)
    # Every position ignored: zero, still attached to the graph.
    student.requires_grad_(True)
    nothing = decoupled_kd(student, teacher, torch.full((2, 5), -100), 3.0)
    nothing.backward()
    assert nothing.item() == 0.0 and torch.all(student.grad == 0)


def test_dkd_softmax_dim():
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 6, 3, generator=generator), torch.randn(4, 6, 3, generator=generator)
    labels = torch.randint(0, 6, (4, 3), generator=generator)
    moved = decoupled_kd(student.movedim(1, -1), teacher.movedim(1, -1), labels, 2.0)
    assert torch.isclose(decoupled_kd(student, teacher, labels, 2.0, softmax_dim=1), moved)


def test_dkd_confident_teacher_and_huge_logits_stay_finite():
    student = torch.tensor([[0.0, 1.0, 2.0], [1e4, -1e4, 0.0]], requires_grad=True)
    teacher = torch.tensor([[200.0, 0.0, 0.0], [1e4, -1e4, float('-inf')]])  # p_y rounds to 1; a masked class
    loss = decoupled_kd(student, teacher, torch.tensor([0, 0]), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_dkd_gradient_matches_float64_autograd():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    teacher = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (5,), generator=generator)

    def written_out(s: torch.Tensor) -> torch.Tensor:
        p, q = torch.softmax(teacher / 2.0, -1), torch.softmax(s / 2.0, -1)
        one_hot = torch.nn.functional.one_hot(labels, 4).bool()
        p_y, q_y = p[one_hot], q[one_hot]
        tckd = p_y * (p_y / q_y).log() + (1 - p_y) * ((1 - p_y) / (1 - q_y)).log()
        p_hat = p[~one_hot].reshape(5, 3) / (1 - p_y)[:, None]
        q_hat = q[~one_hot].reshape(5, 3) / (1 - q_y)[:, None]
        nckd = (p_hat * (p_hat / q_hat).log()).sum(-1)
        return (4.0 * (1.0 * tckd + 3.0 * nckd)).mean()

    s64 = student.clone().requires_grad_(True)
    written_out(s64).backward()
    s32 = student.float().requires_grad_(True)
    decoupled_kd(s32, teacher.float(), labels, 2.0, 1.0, 3.0).backward()
    assert torch.allclose(s32.grad.double(), s64.grad, atol=1e-6)


def test_dkd_refuses_bad_input():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match='labels'):
        DecoupledKD()(s, t)  # no labels
    with pytest.raises(ValueError, match='integer'):
        decoupled_kd(s, t, torch.zeros(4))
    with pytest.raises(ValueError, match='without the class dimension'):
        decoupled_kd(s, t, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match='at least 2 classes'):
        decoupled_kd(torch.randn(4, 1), torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='beta'):
        DecoupledKD(beta=-1.0)


def test_standardize_equals_formula():
    generator = torch.Generator().manual_seed(5)
    logits = 7 * torch.randn(3, 4, 9, generator=generator) + 2
    expected = [reference_standardize(row) for row in logits.double().reshape(-1, 9).tolist()]
    got = standardize_logits(logits).reshape(-1, 9)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    # Along another dimension.
    assert torch.allclose(standardize_logits(logits, dim=1), standardize_logits(logits.movedim(1, -1)).movedim(-1, 1))


def test_standardize_masked_classes_and_constant_vectors():
    row = torch.tensor([[1.0, float('-inf'), 3.0, 5.0], [2.0, 2.0, 2.0, 2.0]], requires_grad=True)
    z = standardize_logits(row)
    assert torch.allclose(z[0, [0, 2, 3]], torch.tensor(reference_standardize([1.0, 3.0, 5.0]), dtype=torch.float32))
    assert z[0, 1] == float('-inf') and torch.all(z[1] == 0)
    z[:, [0, 2, 3]].sum().backward()
    assert torch.isfinite(row.grad).all()


def test_standardized_kd_equals_formula():
    """Sun et al.'s Algorithm 1: T^2 KL(softmax(Z(t)/T) || softmax(Z(s)/T)), T the base temperature."""
    generator = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(10, 6, generator=generator), 20 * torch.randn(10, 6, generator=generator)
    temperature, total = 2.0, 0.0
    for s_row, t_row in zip(student.double().tolist(), teacher.double().tolist(), strict=True):
        p = softmax(reference_standardize(t_row), temperature)
        q = softmax(reference_standardize(s_row), temperature)
        total += temperature**2 * kl(p, q)
    expected = total / 10
    assert Standardized(KLDivergence(temperature))(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert get_loss('kl', temperature=temperature, standardize=True)(student, teacher).item() == pytest.approx(
        expected, rel=1e-5
    )
    # Invariant to a shift and a positive scale of either model's logits: only their relations matter.
    loss = Standardized(KLDivergence(temperature))
    assert torch.isclose(loss(student, teacher), loss(3 * student - 1, 0.5 * teacher + 7), rtol=1e-4)


def test_standardized_passes_mask_labels_and_temperature():
    generator = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(2, 4, 8, generator=generator), torch.randn(2, 4, 8, generator=generator)
    labels = torch.randint(0, 8, (2, 4), generator=generator)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    zs, zt = standardize_logits(student), standardize_logits(teacher)
    dkd = Standardized(DecoupledKD(temperature=2.0, beta=4.0))
    assert torch.isclose(
        dkd(student, teacher, mask=mask, labels=labels), decoupled_kd(zs, zt, labels, 2.0, 1.0, 4.0, mask=mask)
    )
    # A loss without mask or labels receives only the kept rows.
    plain = Standardized(lambda s, t: ((s - t) ** 2).mean())
    assert torch.isclose(plain(student, teacher, mask=mask, labels=labels), ((zs[mask] - zt[mask]) ** 2).mean())
    dkd.temperature = 3.0
    assert dkd.loss.temperature == 3.0 and dkd.temperature == 3.0


def test_registered_by_name():
    assert LOSSES['dkd'] is DecoupledKD
    loss = get_loss('dkd', temperature=2.0, alpha=0.5, beta=2.0, standardize=True)
    assert isinstance(loss, Standardized) and isinstance(loss.loss, DecoupledKD)
    assert (loss.temperature, loss.loss.alpha, loss.loss.beta) == (2.0, 0.5, 2.0)
    with pytest.raises(ValueError, match='already'):
        Standardized(loss)
