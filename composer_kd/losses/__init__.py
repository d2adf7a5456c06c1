"""Distillation losses: pure functions on tensors, and ``nn.Module`` forms usable as ``kd_loss_fn``.

Every function compares ``student`` with ``teacher`` position by position (a position is everything but the
class dimension) and averages over positions, or over the positions where ``mask`` is true. Losses between
distributions soften both with a temperature ``T``, work in float32 log space (large logits cannot overflow,
``-inf`` entries give no NaN) and are multiplied by ``T ** 2``, which keeps their gradients' magnitude
independent of ``T`` (Hinton et al., 2015), so a loss weight need not be re-tuned when ``T`` changes.

The package holds one family per module: :mod:`~composer_kd.losses.divergences` (KL, reverse KL, JS, soft
cross-entropy, MSE, cosine), :mod:`~composer_kd.losses.chunked` (token-level KL a chunk at a time),
:mod:`~composer_kd.losses.generative` (generalized JSD, skew KL), :mod:`~composer_kd.losses.decoupled` (DKD, logit
standardization), :mod:`~composer_kd.losses.labels` (hidden labels) and :mod:`~composer_kd.losses.catalog` (names);
:mod:`~composer_kd.losses.base` holds what they share. Every name is importable from ``composer_kd.losses``.
"""

from __future__ import annotations

from composer_kd.losses.base import mean_over_positions
from composer_kd.losses.catalog import LOSS_ALIASES, LOSSES, canonical_loss_name, get_loss, loss_from_name
from composer_kd.losses.chunked import chunked_kl_divergence
from composer_kd.losses.decoupled import DecoupledKD, Standardized, decoupled_kd, standardize_logits
from composer_kd.losses.divergences import (
    CosineDistance,
    JensenShannonDivergence,
    KLDivergence,
    LogitsMSE,
    ReverseKLDivergence,
    SoftCrossEntropy,
    cosine_distance,
    jensen_shannon_divergence,
    kl_divergence,
    logits_mse,
    reverse_kl_divergence,
    soft_cross_entropy,
)
from composer_kd.losses.generative import (
    GeneralizedJSD,
    SkewKLDivergence,
    SkewReverseKLDivergence,
    generalized_jsd,
    skew_kl_divergence,
    skew_reverse_kl_divergence,
)
from composer_kd.losses.labels import IGNORE_INDEX, cross_entropy_with_hidden_labels

__all__ = [
    'CosineDistance',
    'DecoupledKD',
    'GeneralizedJSD',
    'IGNORE_INDEX',
    'JensenShannonDivergence',
    'KLDivergence',
    'LOSSES',
    'LOSS_ALIASES',
    'LogitsMSE',
    'ReverseKLDivergence',
    'SkewKLDivergence',
    'SkewReverseKLDivergence',
    'SoftCrossEntropy',
    'Standardized',
    'canonical_loss_name',
    'chunked_kl_divergence',
    'cosine_distance',
    'cross_entropy_with_hidden_labels',
    'decoupled_kd',
    'generalized_jsd',
    'get_loss',
    'jensen_shannon_divergence',
    'kl_divergence',
    'logits_mse',
    'loss_from_name',
    'mean_over_positions',
    'reverse_kl_divergence',
    'skew_kl_divergence',
    'skew_reverse_kl_divergence',
    'soft_cross_entropy',
    'standardize_logits',
]
