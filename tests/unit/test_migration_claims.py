"""Each statement the migration pages make about another tool's loss, checked on the same random inputs.

The other tool's formula is written out here by hand, in plain torch, from how its code computes the loss (none
of those packages is imported), and compared with what this package computes with the settings the pages give.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from composer_kd import (
    Distillation,
    KLDivergence,
    LogitsMSE,
    ReverseKLDivergence,
    SoftCrossEntropy,
    combine_losses,
    distillation_loss,
    get_loss,
)
from composer_kd.models.outputs import token_mask
from composer_kd.parts.features import FEATURE_LOSSES

TOL = {'rtol': 1e-5, 'atol': 1e-6}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def grad_of(loss_fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss ``loss_fn(s)`` and its gradient with respect to a fresh leaf copy ``s`` of ``student``."""
    leaf = student.detach().clone().requires_grad_(True)
    value = loss_fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


# --- Composer's draft ---------------------------------------------------------------------------------------------


def draft_kl(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """The draft's ``KLDivergence.forward(y_student, y_teacher)``: log-softmax of its first argument against the
    softmax of its second, ``kl_div`` summed and divided by the size of dimension 0, times ``T**2``."""
    log_first = F.log_softmax(first / temperature, dim=-1)
    probs_second = F.softmax(second / temperature, dim=-1)
    return F.kl_div(log_first, probs_second, reduction='batchmean') * temperature**2


def test_draft_call_order_trains_reverse_kl():
    # The draft's apply passed (teacher_output, student_output) to a loss taking (student, teacher).
    student, teacher, T = torch.randn(8, 10), torch.randn(8, 10), 4.0
    draft_value, draft_grad = grad_of(lambda s: draft_kl(teacher, s, T), student)
    ours_value, ours_grad = grad_of(lambda s: ReverseKLDivergence(T)(s, teacher), student)
    assert_close(draft_value, ours_value, **TOL)
    assert_close(draft_grad, ours_grad, **TOL)
    # ... which is not what KLDivergence computes.
    assert not torch.allclose(draft_value, KLDivergence(T)(student, teacher))


def test_same_call_here_is_forward_kl():
    # kd_loss_fn=KLDivergence(...) receives (student, teacher) here: the draft's loss with its arguments in order.
    student, teacher, T = torch.randn(8, 10), torch.randn(8, 10), 4.0
    draft_value, draft_grad = grad_of(lambda s: draft_kl(s, teacher, T), student)
    ours_value, ours_grad = grad_of(lambda s: KLDivergence(T)(s, teacher), student)
    assert_close(draft_value, ours_value, **TOL)
    assert_close(draft_grad, ours_grad, **TOL)


def test_draft_default_weights_and_ours():
    # The draft's defaults: kd_loss_weight 0.9, org_loss_weight 0.1; its total is org * loss + kd * kd_loss.
    original, kd = torch.tensor(1.7), torch.tensor(0.3)
    draft_total = 0.1 * original + 0.9 * kd
    assert_close(combine_losses(original, kd, 0.1, 0.9)['total'], draft_total, **TOL)
    defaults = inspect.signature(Distillation).parameters
    assert defaults['org_loss_weight'].default == 1.0
    assert defaults['kd_loss_weight'].default == 1.0


def test_draft_on_token_logits_is_sequence_length_times_larger():
    # On [batch, seq, vocab] logits the draft divides the summed KL by the batch size only.
    batch, seq, vocab, T = 3, 7, 11, 2.0
    student, teacher = torch.randn(batch, seq, vocab), torch.randn(batch, seq, vocab)
    assert_close(draft_kl(teacher, student, T), seq * ReverseKLDivergence(T)(student, teacher), **TOL)
    assert_close(draft_kl(student, teacher, T), seq * KLDivergence(T)(student, teacher), **TOL)


# --- torchdistill's KDLoss ----------------------------------------------------------------------------------------


def torchdistill_kd(student, teacher, targets, temperature, alpha=None, beta=None, reduction='batchmean'):
    """torchdistill 1.1.5's ``KDLoss``: softmax over dimension 1, ``nn.KLDivLoss(reduction)`` of the softened
    distributions; without ``alpha`` (None or 0) or targets that KL alone; otherwise
    ``alpha * CE + beta * T**2 * KL`` with ``beta = 1 - alpha`` unless given and CE reduced by ``'mean'`` for
    ``'batchmean'``, else by ``reduction``."""
    if beta is None:
        beta = 1 - alpha  # an alpha of None with no beta fails here, as there
    log_q = torch.log_softmax(student / temperature, dim=1)
    p = torch.softmax(teacher / temperature, dim=1)
    pointwise = p * (p.log() - log_q)
    if reduction == 'batchmean':
        soft = pointwise.sum() / student.shape[0]
    elif reduction == 'sum':
        soft = pointwise.sum()
    else:
        soft = pointwise.mean()
    if alpha is None or alpha == 0 or targets is None:
        return soft
    hard = F.cross_entropy(student, targets, reduction='mean' if reduction == 'batchmean' else reduction)
    return alpha * hard + beta * temperature**2 * soft


@pytest.fixture
def classifier_logits():
    return torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))


def test_kdloss_alpha_is_org_loss_weight(classifier_logits):
    student, teacher, labels = classifier_logits
    T, alpha = 4.0, 0.9
    expected = torchdistill_kd(student, teacher, labels, T, alpha)
    ours = combine_losses(F.cross_entropy(student, labels), KLDivergence(T)(student, teacher), alpha, 1 - alpha)
    assert_close(ours['total'], expected, **TOL)


def test_kdloss_explicit_beta_is_kd_loss_weight(classifier_logits):
    student, teacher, labels = classifier_logits
    T, alpha, beta = 3.0, 0.5, 2.0
    expected = torchdistill_kd(student, teacher, labels, T, alpha, beta)
    ours = combine_losses(F.cross_entropy(student, labels), KLDivergence(T)(student, teacher), alpha, beta)
    assert_close(ours['total'], expected, **TOL)


@pytest.mark.parametrize(
    ('alpha', 'beta', 'with_targets'),
    [(0.9, None, False), (0.0, 0.3, True), (None, 0.3, True)],
    ids=['no-targets', 'alpha-0', 'alpha-None'],
)
def test_kdloss_without_alpha_or_targets_is_bare_kl(classifier_logits, alpha, beta, with_targets):
    student, teacher, labels = classifier_logits
    T = 4.0
    expected = torchdistill_kd(student, teacher, labels if with_targets else None, T, alpha, beta)
    # No T**2, no weight: KLDivergence divided by T**2.
    assert_close(KLDivergence(T)(student, teacher) / T**2, expected, **TOL)


def test_kdloss_alpha_none_needs_beta(classifier_logits):
    student, teacher, labels = classifier_logits
    with pytest.raises(TypeError):
        torchdistill_kd(student, teacher, labels, 4.0, alpha=None)


def test_kdloss_sum_reduction_scales_both_weights_by_batch_size(classifier_logits):
    student, teacher, labels = classifier_logits
    T, alpha, n = 4.0, 0.9, student.shape[0]
    expected = torchdistill_kd(student, teacher, labels, T, alpha, reduction='sum')
    ours = combine_losses(
        F.cross_entropy(student, labels), KLDivergence(T)(student, teacher), n * alpha, n * (1 - alpha)
    )
    assert_close(ours['total'], expected, **TOL)


def test_kdloss_mean_reduction_divides_kd_weight_by_classes(classifier_logits):
    student, teacher, labels = classifier_logits
    T, alpha, classes = 4.0, 0.9, student.shape[1]
    expected = torchdistill_kd(student, teacher, labels, T, alpha, reduction='mean')
    ours = combine_losses(
        F.cross_entropy(student, labels), KLDivergence(T)(student, teacher), alpha, (1 - alpha) / classes
    )
    assert_close(ours['total'], expected, **TOL)


def test_kdloss_dense_logits_carry_height_times_width():
    n, classes, height, width = 4, 5, 3, 6
    student, teacher = torch.randn(n, classes, height, width), torch.randn(n, classes, height, width)
    labels = torch.randint(0, classes, (n, height, width))
    T, alpha = 2.0, 0.7
    expected = torchdistill_kd(student, teacher, labels, T, alpha)
    kd = KLDivergence(T, softmax_dim=1)(student, teacher)  # averaged over the n * height * width positions
    ours = combine_losses(F.cross_entropy(student, labels), kd, alpha, (1 - alpha) * height * width)
    assert_close(ours['total'], expected, **TOL)


# --- AutoMM -------------------------------------------------------------------------------------------------------


def automm_soft_label(student, teacher, temperature, loss_type):
    """AutoMM's soft-label term: both logits divided by T, then cross-entropy against the teacher's softmax
    (classification's default) or mean squared error of the divided logits (regression's default, or 'mse')."""
    s, t = student.squeeze(1) / temperature, teacher.squeeze(1) / temperature
    if loss_type == 'cross_entropy':
        return -(F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum(-1).mean()
    return ((s - t) ** 2).mean()


def test_automm_classification_soft_label_mapping():
    student, teacher, T, weight = torch.randn(16, 2), torch.randn(16, 2), 5.0, 5.0
    expected = weight * automm_soft_label(student, teacher, T, 'cross_entropy')
    assert_close((weight / T**2) * SoftCrossEntropy(T)(student, teacher), expected, **TOL)


@pytest.mark.parametrize('width', [1, 3], ids=['regression', 'classification-mse'])
def test_automm_mse_soft_label_mapping(width):
    # Regression (one output, AutoMM squeezes it to [N]) and soft_label_loss_type 'mse' on class logits.
    student, teacher, T, weight = torch.randn(16, width), torch.randn(16, width), 5.0, 5.0
    expected = weight * automm_soft_label(student, teacher, T, 'mse')
    assert_close((weight / T**2) * LogitsMSE()(student, teacher), expected, **TOL)


def automm_output_feature_loss(loss_type: str):
    """AutoMM's choice of output-feature loss: torch's MSELoss for 'mse', CosineEmbeddingLoss for 'cosine', and a
    ValueError for any other name."""
    if loss_type == 'cosine':
        cosine = torch.nn.CosineEmbeddingLoss()
        return lambda student, teacher: cosine(student, teacher, torch.ones(student.shape[0]))  # called as intended
    if loss_type == 'mse':
        return torch.nn.MSELoss()
    raise ValueError(f'Unknown output_feature_loss_type: {loss_type}')


@pytest.mark.parametrize('loss_type', ['mse', 'cosine'])
def test_automm_output_feature_losses(loss_type):
    student, teacher = torch.randn(8, 32), torch.randn(8, 32)
    expected = automm_output_feature_loss(loss_type)(student, teacher)
    assert_close(FEATURE_LOSSES[loss_type](student, teacher, None), expected, **TOL)
    assert_close(get_loss(loss_type)(student, teacher), expected, **TOL)


def test_automm_cosine_by_hand():
    student, teacher = torch.randn(8, 32), torch.randn(8, 32)
    by_hand = (1 - (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))).mean()
    assert_close(automm_output_feature_loss('cosine')(student, teacher), by_hand, **TOL)


def test_automm_calls_cosine_loss_with_keywords_it_does_not_take():
    # AutoMM passes the features as input=/target=; torch's CosineEmbeddingLoss takes (input1, input2, target).
    with pytest.raises(TypeError):
        torch.nn.CosineEmbeddingLoss()(input=torch.randn(4, 8), target=torch.randn(4, 8))


@pytest.mark.parametrize(('readme_name', 'code_name'), [('mean_square_error', 'mse'), ('cosine_distance', 'cosine')])
def test_readme_feature_loss_names_fail_in_automm_but_work_here(readme_name, code_name):
    with pytest.raises(ValueError):
        automm_output_feature_loss(readme_name)
    student, teacher = torch.randn(8, 32), torch.randn(8, 32)
    assert_close(
        get_loss(readme_name)(student, teacher), automm_output_feature_loss(code_name)(student, teacher), **TOL
    )


# --- token-level losses elsewhere ---------------------------------------------------------------------------------


def hf_distiller_kl(student, teacher, selected, temperature):
    """Hugging Face's distillation example: the rows of [batch, seq, vocab] logits where ``selected`` is true,
    ``nn.KLDivLoss(reduction='batchmean')`` over those rows, times ``T**2``."""
    s = student[selected.bool()]
    t = teacher[selected.bool()]
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1), reduction='batchmean')
    return kl * temperature**2


@pytest.fixture
def mlm_batch():
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.full((2, 6), -100)
    labels[0, 1], labels[0, 4], labels[1, 2] = 5, 9, 3  # the masked-out tokens to predict
    return {'input_ids': torch.randint(0, 11, (2, 6)), 'attention_mask': attention_mask, 'labels': labels}


def test_hf_mlm_default_counts_every_non_padding_token(mlm_batch):
    student, teacher, T = torch.randn(2, 6, 11), torch.randn(2, 6, 11), 2.0
    expected = hf_distiller_kl(student, teacher, mlm_batch['attention_mask'], T)
    assert_close(KLDivergence(T)(student, teacher, mask=mlm_batch['attention_mask'].bool()), expected, **TOL)
    ours = distillation_loss(student, teacher, KLDivergence(T), mask=token_mask(mlm_batch, student))
    assert not torch.allclose(ours, expected)


def test_hf_mlm_restrict_ce_to_mask_is_ours(mlm_batch):
    student, teacher, T = torch.randn(2, 6, 11), torch.randn(2, 6, 11), 2.0
    expected = hf_distiller_kl(student, teacher, mlm_batch['labels'] > -1, T)
    ours = distillation_loss(student, teacher, KLDivergence(T), mask=token_mask(mlm_batch, student))
    assert_close(ours, expected, **TOL)


def test_hf_clm_keeps_each_sequence_last_position():
    lengths = torch.tensor([6, 4, 2])
    attention_mask = (torch.arange(6) < lengths[:, None]).long()
    input_ids = torch.randint(0, 11, (3, 6))
    batch = {
        'input_ids': input_ids,
        'attention_mask': attention_mask,
        'labels': input_ids.masked_fill(attention_mask == 0, -100),
    }
    student, teacher, T = torch.randn(3, 6, 11), torch.randn(3, 6, 11), 2.0
    # Hugging Face's causal distiller selects every non-padding position, unshifted.
    expected = hf_distiller_kl(student, teacher, attention_mask, T)
    assert_close(KLDivergence(T)(student, teacher, mask=attention_mask.bool()), expected, **TOL)
    # Ours drops each sequence's last position, which predicts no token of the batch.
    without_last = attention_mask.bool().clone()
    without_last[torch.arange(3), lengths - 1] = False
    mask = token_mask(batch, student, causal=True)
    assert torch.equal(mask, without_last)
    assert_close(
        distillation_loss(student, teacher, KLDivergence(T), mask=mask),
        hf_distiller_kl(student, teacher, without_last, T),
        **TOL,
    )


def torchtune_forward_kl(student, teacher, labels, ignore_index=-100):
    """torchtune 0.6.1's ``ForwardKLLoss`` (no temperature): per position ``-sum_c p_teacher * log q_student``,
    averaged over the positions whose label is not ``ignore_index``."""
    per_position = -(F.softmax(teacher, dim=-1) * F.log_softmax(student, dim=-1)).sum(-1)
    keep = (labels != ignore_index).float()
    return (per_position * keep).sum() / keep.sum()


def torchtune_reverse_kl(student, teacher, labels, ignore_index=-100):
    """torchtune 0.6.1's ``ReverseKLLoss``: per position ``sum_c q_student * (log q_student - log p_teacher)``."""
    q = F.softmax(student, dim=-1)
    per_position = (q * (F.log_softmax(student, dim=-1) - F.log_softmax(teacher, dim=-1))).sum(-1)
    keep = (labels != ignore_index).float()
    return (per_position * keep).sum() / keep.sum()


@pytest.fixture
def lm_logits():
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 4:], labels[1, :2] = -100, -100  # padding, and a prompt whose tokens are not trained on
    return student, teacher, labels


def torchtune_shift(labels: torch.Tensor) -> torch.Tensor:
    """torchtune's recipe aligns position i with label i + 1 by shifting the labels and ignoring the last."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def test_torchtune_forward_kl_is_soft_cross_entropy(lm_logits):
    student, teacher, labels = lm_logits
    shifted = torchtune_shift(labels)
    mask = token_mask({'labels': labels}, student, causal=True)
    assert torch.equal(mask, shifted != -100)  # the same positions count
    tt_value, tt_grad = grad_of(lambda s: torchtune_forward_kl(s, teacher, shifted), student)
    soft_ce_value, soft_ce_grad = grad_of(lambda s: SoftCrossEntropy(1.0)(s, teacher, mask=mask), student)
    kl_value, kl_grad = grad_of(lambda s: KLDivergence(1.0)(s, teacher, mask=mask), student)
    assert_close(tt_value, soft_ce_value, **TOL)
    assert_close(tt_grad, soft_ce_grad, **TOL)
    # KLDivergence: the same gradient, a value lower by the teacher's entropy (averaged over the same positions).
    teacher_entropy = -(F.softmax(teacher, -1) * F.log_softmax(teacher, -1)).sum(-1)[mask].mean()
    assert_close(tt_value - teacher_entropy, kl_value, **TOL)
    assert_close(tt_grad, kl_grad, **TOL)


def test_torchtune_kd_ratio_is_the_pair_of_weights(lm_logits):
    student, teacher, labels = lm_logits
    shifted, kd_ratio = torchtune_shift(labels), 0.5
    class_loss = F.cross_entropy(student.reshape(-1, 11), shifted.reshape(-1), ignore_index=-100)
    expected = (1 - kd_ratio) * class_loss + kd_ratio * torchtune_forward_kl(student, teacher, shifted)
    mask = token_mask({'labels': labels}, student, causal=True)
    kd = distillation_loss(student, teacher, SoftCrossEntropy(1.0), mask=mask)
    assert_close(combine_losses(class_loss, kd, 1 - kd_ratio, kd_ratio)['total'], expected, **TOL)


def test_torchtune_reverse_kl_is_reverse_kl(lm_logits):
    student, teacher, labels = lm_logits
    shifted = torchtune_shift(labels)
    ours = ReverseKLDivergence(1.0)(student, teacher, mask=shifted != -100)
    assert_close(ours, torchtune_reverse_kl(student, teacher, shifted), **TOL)
