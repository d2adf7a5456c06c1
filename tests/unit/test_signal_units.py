"""The teacher signal's encoding and KD term, against independent computations written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from composer_kd.cache import topk_compress
from composer_kd.losses.signal import signal_kl, signal_kl_per_position
from composer_kd.signal.encoding import (
    bits_per_index,
    bytes_per_token,
    decode_signal,
    encode_signal,
    pack_indices,
    unpack_indices,
)


@pytest.mark.parametrize('bits', [1, 3, 7, 8, 15, 17, 32])
def test_packed_indices_round_trip_in_the_stated_number_of_bytes(bits):
    values = np.random.default_rng(bits).integers(0, 2**bits, size=37)
    packed = pack_indices(values, bits)
    assert len(packed) == math.ceil(37 * bits / 8)
    assert unpack_indices(packed, 37, bits).tolist() == values.tolist()


def test_bits_per_index_and_bytes_per_token():
    assert [bits_per_index(v) for v in (2, 3, 4, 5, 30522, 32768, 32769, 50257, 128256)] == [
        1,
        2,
        2,
        3,
        15,
        15,
        16,
        16,
        17,
    ]
    # 128 logits of 2 bytes, 128 indices of 17 bits, a float32 tail.
    assert bytes_per_token(128, 128256) == 256 + 128 * 17 / 8 + 4


def test_out_of_range_indices_are_refused():
    with pytest.raises(ValueError, match=r'\[0, 2\*\*3\)'):
        pack_indices(np.array([8]), 3)


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_encoding_round_trip_is_exact_for_what_is_stored(dtype):
    logits = torch.randn(20, 301) * 5
    values, indices, log_tail = decode_signal(encode_signal(logits, k=16, value_dtype=dtype))
    top = logits.topk(16)
    assert torch.equal(indices, top.indices)
    assert torch.equal(values, top.values.to(getattr(torch, dtype)).float())
    rest = logits.scatter(-1, top.indices, float('-inf'))
    torch.testing.assert_close(log_tail, torch.logsumexp(rest, -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize('k', [0, 301, 400])
def test_k_outside_the_vocabulary_is_refused(k):
    with pytest.raises(
        ValueError, match=rf'k={k} must be an integer between 1 and the vocabulary size minus one \(300\)'
    ):
        encode_signal(torch.randn(2, 301), k=k)


def _dense_teacher(values, indices, log_tail, vocab):
    """The teacher distribution the signal stands for, built class by class: kept logits exact, every other class
    the logit log_tail - log(V - k)."""
    k = values.shape[-1]
    dense = torch.empty(*values.shape[:-1], vocab, dtype=torch.float64)
    for position in np.ndindex(*values.shape[:-1]):
        shared = float(log_tail[position]) - math.log(vocab - k)
        dense[position] = shared
        for j in range(k):
            dense[position + (int(indices[position + (j,)]),)] = float(values[position + (j,)])
    return dense


@pytest.mark.parametrize('temperature', [1.0, 2.0, 0.5])
def test_kd_term_is_the_kl_to_the_rebuilt_teacher(temperature):
    torch.manual_seed(0)
    vocab, k = 40, 6
    teacher, student = torch.randn(2, 5, vocab) * 3, torch.randn(2, 5, vocab, requires_grad=True)
    values, indices, log_tail = topk_compress(teacher, k)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])

    loss = signal_kl(student, indices, values, log_tail, temperature, mask)
    dense = _dense_teacher(values, indices, log_tail, vocab)
    p = torch.softmax(dense / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    per_position = (p * (p.log() - log_q)).sum(-1) * temperature**2
    expected = per_position[mask].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)

    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6)


def test_at_temperature_one_the_kept_probabilities_and_tail_mass_are_the_teachers():
    torch.manual_seed(1)
    teacher = torch.randn(3, 50)
    values, indices, log_tail = topk_compress(teacher, 5)
    p = torch.softmax(_dense_teacher(values, indices, log_tail, 50), -1)
    full = torch.softmax(teacher.double(), -1)
    torch.testing.assert_close(p.gather(-1, indices), full.gather(-1, indices))
    kept = torch.zeros_like(full, dtype=torch.bool).scatter(-1, indices, True)
    torch.testing.assert_close(p[~kept].reshape(3, -1).sum(-1), full[~kept].reshape(3, -1).sum(-1))


def test_a_tail_with_no_mass_gives_finite_values_and_gradients():
    student = torch.randn(1, 10, requires_grad=True)
    values, indices = torch.tensor([[2.0, 1.0]]), torch.tensor([[3, 7]])
    loss = signal_kl_per_position(student, indices, values, torch.tensor([float('-inf')])).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_shape_mismatches_name_the_argument():
    with pytest.raises(ValueError, match='log_tail'):
        signal_kl_per_position(
            torch.randn(2, 10), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(3)
        )
    with pytest.raises(ValueError, match='topk_indices'):
        signal_kl_per_position(
            torch.randn(2, 10), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2)
        )


def test_the_students_logits_are_not_written_to_and_keep_their_dtype():
    values, indices, log_tail = topk_compress(torch.randn(4, 30), 3)
    student = torch.randn(4, 30, requires_grad=True)
    before = student.detach().clone()
    signal_kl_per_position(student, indices, values, log_tail, 1.0).sum().backward()
    assert torch.equal(student.detach(), before)
    half = torch.randn(4, 30, dtype=torch.bfloat16, requires_grad=True)
    signal_kl_per_position(half, indices, values, log_tail, 2.0).sum().backward()
    assert half.grad.dtype == torch.bfloat16


def test_a_batch_is_reduced_to_its_top_k_before_it_leaves_the_teachers_device(monkeypatch):
    """The writer selects the top k, the tail and the kept mass of a whole ``[B, L, V]`` batch where the teacher ran;
    what reaches the host is ``[B, L, k]`` values and indices, ``[B, L]`` tails and one number, in as many transfers
    however many sequences the batch holds, and it encodes as each position's own ``encode_signal`` does."""
    from composer_kd.signal import writer
    from composer_kd.signal.writer import TokenSequences, _TeacherPass

    vocab, k = 97, 6
    teacher = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    ids = torch.randint(0, vocab, (5, 7), generator=torch.Generator().manual_seed(0))
    teacher_pass = _TeacherPass(teacher, TokenSequences(ids.numpy(), 'ids'), k, 'bfloat16', 5, 'input_ids', None, 'cpu')
    moved, original, encoding, encode_topk = [], torch.Tensor.cpu, [], writer.encode_topk

    def cpu(tensor, *args, **kwargs):
        if not encoding:  # rows already on the host, encoded one by one
            moved.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    def encode_row(*args, **kwargs):
        encoding.append(1)
        try:
            return encode_topk(*args, **kwargs)
        finally:
            encoding.pop()

    monkeypatch.setattr(torch.Tensor, 'cpu', cpu)
    monkeypatch.setattr(writer, 'encode_topk', encode_row)
    encoded, kept = teacher_pass.encode(ids, vocab)
    transfers = list(moved)
    monkeypatch.setattr(torch.Tensor, 'cpu', original)
    assert sorted(transfers) == [(5, 7), (5, 7, k), (5, 7, k)]  # and the kept mass, one float
    with torch.no_grad():
        logits = teacher(ids).float()
    for row in range(5):
        expected = encode_signal(logits[row], k, 'bfloat16')
        assert encoded[row].values == expected.values and encoded[row].indices == expected.indices
        assert np.array_equal(encoded[row].log_tail, expected.log_tail)
    assert kept == pytest.approx(float(logits.softmax(-1).topk(k).values.sum(-1).double().sum()), rel=1e-5)


def test_each_rank_runs_the_teacher_on_its_own_accelerator():
    from composer_kd.signal.writer import _Ranks

    assert _Ranks(3, 4, local_rank=1).device('cuda') == torch.device('cuda', 1)
    assert _Ranks(3, 4, local_rank=1).device('cuda:0') == torch.device('cuda', 0)  # named by the caller
    assert _Ranks(3, 4, local_rank=1).device('cpu') == torch.device('cpu')
    assert _Ranks().device('cuda') == torch.device('cuda')
