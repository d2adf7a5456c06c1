"""The fused output layer + loss equals the unfused computation, written out here from full logits, in value and in
the gradients of the student's hidden states, output weight and bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from composer_kd.cache import topk_compress
from composer_kd.losses import DecoupledKD, GeneralizedJSD, KLDivergence, get_loss
from composer_kd.losses.fused import (
    DenseTeacherChunks,
    SignalTeacherChunks,
    default_chunk_size,
    fused_linear_distillation,
    per_position_terms,
)


def written_out_kd(student_logits, teacher_logits, name, temperature, mask, beta=0.5):
    """Each divergence from its textbook formula on full logits (not through composer_kd.losses)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if name == 'kl':
        rows = (p * (log_p - log_q)).sum(-1)
    elif name == 'reverse_kl':
        rows = (q * (log_q - log_p)).sum(-1)
    elif name == 'soft_ce':
        rows = -(p * log_q).sum(-1)
    else:
        b = 0.5 if name == 'js' else beta
        m = b * p + (1 - b) * q
        rows = b * (p * (log_p - m.log())).sum(-1) + (1 - b) * (q * (log_q - m.log())).sum(-1)
    rows = rows * temperature**2
    if mask is None:
        return rows.mean()
    return (rows * mask).sum() / mask.sum().clamp(min=1)


def written_out_ce(student_logits, labels):
    if labels is None:
        return torch.zeros(())
    known = labels != -100
    rows = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction='none')
    return (rows * known).sum() / known.sum().clamp(min=1)


def make_case(rows, hidden, vocab, teacher_hidden, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator)
    w = torch.randn(vocab, hidden, generator=generator) * 0.5
    b = torch.randn(vocab, generator=generator) if bias else None
    th = torch.randn(rows, teacher_hidden, generator=generator)
    tw = torch.randn(vocab, teacher_hidden, generator=generator) * 0.5
    tb = torch.randn(vocab, generator=generator) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.3] = -100
    return h, w, b, th, tw, tb, labels


def reference(h, w, b, th, tw, tb, labels, mask, name, temperature, weights, beta=0.5):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    s = F.linear(h, w, b)
    t = F.linear(th, tw, tb)
    ce = written_out_ce(s, labels)
    kd = written_out_kd(s, t, name, temperature, mask, beta)
    total = weights[0] * ce + weights[1] * kd
    total.backward()
    return total.detach(), ce.detach(), kd.detach(), h.grad, w.grad, None if b is None else b.grad


def fused(h, w, b, th, tw, tb, labels, mask, loss_fn, temperature, weights, chunk_size):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    out = fused_linear_distillation(
        h,
        w,
        (th, tw, tb),
        labels=labels,
        kd_mask=mask,
        loss_fn=loss_fn,
        temperature=temperature,
        student_bias=b,
        org_loss_weight=weights[0],
        kd_loss_weight=weights[1],
        chunk_size=chunk_size,
    )
    out.total.backward()
    return out.total.detach(), out.original, out.kd, h.grad, w.grad, None if b is None else b.grad


def assert_equal_to_reference(got, expected):
    names = ('total', 'original', 'kd', 'grad hidden', 'grad weight', 'grad bias')
    for name, a, e in zip(names, got, expected, strict=True):
        if e is None:
            assert a is None, name
            continue
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-5), f'{name}: max diff {(a - e).abs().max().item()}'


@pytest.mark.parametrize('loss_name', ['kl', 'reverse_kl', 'js', 'gjsd', 'soft_ce'])
@pytest.mark.parametrize(
    ('shape', 'chunk_size', 'bias'),
    [((37, 16, 53, 12), 7, True), ((64, 8, 200, 8), 64, False), ((5, 4, 11, 6), 1, True), ((30, 8, 40, 8), 100, False)],
)
def test_fused_equals_unfused(loss_name, shape, chunk_size, bias):
    rows, hidden, vocab, teacher_hidden = shape
    h, w, b, th, tw, tb, labels = make_case(rows, hidden, vocab, teacher_hidden, bias, seed=rows + vocab)
    mask = torch.rand(rows, generator=torch.Generator().manual_seed(1)) > 0.25
    loss_fn = GeneralizedJSD(beta=0.3, temperature=2.0) if loss_name == 'gjsd' else get_loss(loss_name, temperature=2.0)
    weights = (0.3, 0.7)
    expected = reference(h, w, b, th, tw, tb, labels, mask, loss_name, 2.0, weights, beta=0.3)
    got = fused(h, w, b, th, tw, tb, labels, mask, loss_fn, 2.0, weights, chunk_size)
    assert_equal_to_reference(got, expected)


def test_all_masked_chunk_and_chunk_not_dividing_rows():
    # Rows 0..9 are masked for both terms: with chunks of 7, the first chunk has no position that counts.
    h, w, b, th, tw, tb, labels = make_case(26, 8, 30, 8, True, seed=3)
    labels[:10] = -100
    mask = torch.ones(26, dtype=torch.bool)
    mask[:10] = False
    expected = reference(h, w, b, th, tw, tb, labels, mask, 'kl', 1.5, (1.0, 1.0))
    got = fused(h, w, b, th, tw, tb, labels, mask, 'kl', 1.5, (1.0, 1.0), chunk_size=7)
    assert_equal_to_reference(got, expected)
    assert torch.count_nonzero(got[3][:7]) == 0  # no gradient reaches rows that count nowhere


def test_nothing_counts_gives_zero_loss_and_zero_gradients():
    h, w, b, th, tw, tb, labels = make_case(9, 4, 13, 4, False, seed=5)
    labels[:] = -100
    got = fused(h, w, b, th, tw, tb, labels, torch.zeros(9, dtype=torch.bool), 'js', 1.0, (1.0, 1.0), 4)
    assert got[0].item() == 0.0 and not torch.isnan(got[0])
    assert torch.count_nonzero(got[3]) == 0 and torch.count_nonzero(got[4]) == 0


def test_without_labels_or_mask_and_default_chunks():
    h, w, b, th, tw, tb, _ = make_case(40, 8, 25, 8, False, seed=7)
    expected = reference(h, w, b, th, tw, tb, None, None, 'reverse_kl', 3.0, (1.0, 0.5))
    got = fused(h, w, b, th, tw, tb, None, None, 'reverse_kl', 3.0, (1.0, 0.5), None)
    assert_equal_to_reference(got, expected)


def test_temperature_from_module_and_kl_written_by_hand():
    h, w, _, th, tw, _, labels = make_case(12, 6, 9, 5, False, seed=11)
    out = fused_linear_distillation(h, w, (th, tw), labels, loss_fn=KLDivergence(temperature=4.0), chunk_size=5)
    s, t = h @ w.T, th @ tw.T
    by_hand = 0.0
    for row in range(12):
        p = torch.softmax(t[row] / 4.0, -1)
        q = torch.softmax(s[row] / 4.0, -1)
        by_hand += 16.0 * float((p * (p.log() - q.log())).sum())
    assert math.isclose(out.kd.item(), by_hand / 12, rel_tol=1e-5)


def test_several_teachers_are_averaged():
    h, w, b, th, tw, tb, labels = make_case(15, 6, 20, 6, False, seed=13)
    th2, tw2 = torch.randn(15, 10), torch.randn(20, 10)
    teacher = DenseTeacherChunks([th, th2], [tw, tw2])
    hh = h.clone().requires_grad_()
    out = fused_linear_distillation(hh, w, teacher, labels, loss_fn='kl', chunk_size=4)
    out.total.backward()
    h2 = h.clone().requires_grad_()
    s = h2 @ w.T
    mean_teacher = (th @ tw.T + th2 @ tw2.T) / 2
    total = written_out_ce(s, labels) + written_out_kd(s, mean_teacher, 'kl', 1.0, None)
    total.backward()
    assert torch.allclose(out.total, total, atol=1e-5) and torch.allclose(hh.grad, h2.grad, atol=1e-5)


def test_gradient_follows_the_scale_of_the_backward_pass():
    h, w, b, th, tw, tb, labels = make_case(10, 4, 7, 4, True, seed=17)
    expected = reference(h, w, b, th, tw, tb, labels, None, 'kl', 1.0, (1.0, 1.0))
    hh = h.clone().requires_grad_()
    out = fused_linear_distillation(hh, w, (th, tw, tb), labels, loss_fn='kl', student_bias=b, chunk_size=3)
    (out.total * 0.25).backward()  # as Composer scales a microbatch's loss
    assert torch.allclose(hh.grad, expected[3] * 0.25, atol=1e-6)


def test_bf16_autocast_matches_unfused_autocast():
    h, w, b, th, tw, tb, labels = make_case(33, 16, 64, 16, True, seed=19)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected = reference(h, w, b, th, tw, tb, labels, None, 'kl', 2.0, (1.0, 1.0))
        got = fused(h, w, b, th, tw, tb, labels, None, 'kl', 2.0, (1.0, 1.0), 8)
    for name, a, e in zip(('total', 'ce', 'kd', 'grad hidden', 'grad weight', 'grad bias'), got, expected, strict=True):
        assert a.dtype == e.dtype, name
        assert torch.allclose(a.float(), e.float(), atol=2e-2, rtol=2e-2), name


def test_default_chunk_size_and_terms():
    assert default_chunk_size(128_256) == 16
    assert default_chunk_size(10) == 2**21 // 10
    with pytest.raises(ValueError, match='LogitsMSE'):
        per_position_terms('mse')
    with pytest.raises(ValueError, match='DecoupledKD'):
        per_position_terms(DecoupledKD())


def test_bad_input_is_refused_with_the_offending_argument():
    h, w, th, tw = torch.randn(6, 4), torch.randn(10, 4), torch.randn(6, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match='student_weight'):
        fused_linear_distillation(h, torch.randn(10, 5), (th, tw))
    with pytest.raises(ValueError, match='vocabulary'):
        fused_linear_distillation(h, w, (th, torch.randn(11, 3)))
    with pytest.raises(ValueError, match='labels'):
        fused_linear_distillation(h, w, (th, tw), labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match='kd_mask'):
        fused_linear_distillation(h, w, (th, tw), kd_mask=torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match='chunk_size'):
        fused_linear_distillation(h, w, (th, tw), chunk_size=0)
    with pytest.raises(ValueError, match='temperature'):
        fused_linear_distillation(h, w, (th, tw), temperature=0.0)
    with pytest.raises(TypeError, match='TeacherChunks'):
        fused_linear_distillation(h, w, th)


def rebuilt_teacher(values, indices, log_tail, vocab):
    """The dense teacher a stored signal stands for: kept logits exact, the other classes sharing the tail's mass."""
    k = values.shape[-1]
    dense = (log_tail.double() - math.log(vocab - k)).unsqueeze(-1).expand(*log_tail.shape, vocab).clone()
    return dense.scatter(-1, indices.long(), values.double())


@pytest.mark.parametrize('temperature', [1.0, 2.0])
@pytest.mark.parametrize('chunk_size', [3, 64])
def test_a_stored_signal_in_the_loop_equals_the_unfused_signal_kl_and_its_gradients(temperature, chunk_size):
    torch.manual_seed(0)
    rows, hidden_size, vocab, k = 10, 6, 40, 5
    h = torch.randn(rows, hidden_size, requires_grad=True)
    w = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    labels[3] = -100
    mask = torch.ones(rows, dtype=torch.bool)
    mask[[2, 7]] = False
    values, indices, log_tail = topk_compress(torch.randn(rows, vocab) * 3, k)
    signal = SignalTeacherChunks(indices, values, log_tail, vocab)
    fused = fused_linear_distillation(
        h,
        w,
        signal,
        labels=labels,
        kd_mask=mask,
        loss_fn='kl',
        temperature=temperature,
        chunk_size=chunk_size,
        org_loss_weight=0.3,
        kd_loss_weight=0.7,
    )
    fused.total.backward()
    grads = (h.grad.clone(), w.grad.clone())
    h.grad, w.grad = None, None
    # Written out on the full logits and the rebuilt teacher, in float64.
    logits = h.double() @ w.double().T
    log_p = torch.log_softmax(rebuilt_teacher(values, indices, log_tail, vocab) / temperature, -1)
    log_q = torch.log_softmax(logits / temperature, -1)
    kd = ((log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2)[mask].mean()
    ce = F.cross_entropy(logits, labels, ignore_index=-100)
    total = 0.3 * ce + 0.7 * kd
    total.backward()
    torch.testing.assert_close(fused.kd.double(), kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.original.double(), ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0].double(), h.grad.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1].double(), w.grad.double(), rtol=1e-4, atol=1e-6)


def test_a_stored_signal_defines_the_forward_kl_only():
    values, indices, log_tail = topk_compress(torch.randn(6, 10), 2)
    with pytest.raises(ValueError, match='defines the forward KL only'):
        fused_linear_distillation(
            torch.randn(6, 4), torch.randn(10, 4), SignalTeacherChunks(indices, values, log_tail, 10), loss_fn='js'
        )
    with pytest.raises(ValueError, match=r'\[N, k\] indices'):
        SignalTeacherChunks(indices[None], values[None], log_tail[None], 10)


def test_one_backward_pass_per_forward_pass():
    h = torch.randn(4, 3, requires_grad=True)
    out = fused_linear_distillation(h, torch.randn(5, 3), (torch.randn(4, 3), torch.randn(5, 3)))
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='one backward pass'):
        out.total.backward()


def test_without_a_teacher_the_loop_is_the_students_cross_entropy_alone():
    torch.manual_seed(1)
    h = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(12, 5, requires_grad=True)
    labels = torch.randint(0, 12, (7,))
    fused = fused_linear_distillation(h, w, None, labels=labels, chunk_size=3, org_loss_weight=1.0, kd_loss_weight=1.0)
    fused.total.backward()
    grads = (h.grad.clone(), w.grad.clone())
    h.grad, w.grad = None, None
    ce = F.cross_entropy(h @ w.T, labels)
    ce.backward()
    assert float(fused.kd) == 0.0
    torch.testing.assert_close(fused.total, ce.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, (h.grad, w.grad), rtol=1e-5, atol=1e-6)
