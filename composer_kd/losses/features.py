"""Losses between a student's and a teacher's intermediate features, by the names ``FeaturePair(loss=...)`` takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from composer_kd.losses import cosine_distance, logits_mse, mean_over_positions

__all__ = [
    'FEATURE_LOSSES',
    'FeatureLossFn',
    'attention_map',
    'attention_map_loss',
    'attention_probs_mse',
    'feature_dim',
]

#: A loss between student and teacher features, given a mask of the positions that count (or ``None``).
FeatureLossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def feature_dim(features: torch.Tensor) -> int:
    """The dimension holding feature channels: 1 for image maps ``[B, C, H, W]``, else the last one."""
    return 1 if features.ndim == 4 else -1


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a CNN feature map ``[B, C, H, W]``: the channel-mean of squares, flattened, L2-normalized.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.features import attention_map

            assert attention_map(torch.randn(2, 8, 4, 4)).shape == (2, 16)
    """
    if features.ndim != 4:
        raise ValueError(f'attention maps need [batch, channels, height, width] features, got {tuple(features.shape)}.')
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_map_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, 2017): mean squared distance of the two attention maps.

    Channel counts may differ; spatial sizes must match (the student's map is resized to the teacher's if not).

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.features import attention_map_loss

            loss = attention_map_loss(torch.randn(2, 8, 4, 4), torch.randn(2, 32, 4, 4))
    """
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student.float(), size=teacher.shape[-2:], mode='bilinear', align_corners=False)
    return (attention_map(student) - attention_map(teacher)).pow(2).sum(dim=1).mean()


def attention_probs_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """TinyBERT's attention loss: MSE between attention probabilities ``[B, heads, query, key]``.

    Head counts may differ, in which case each side is averaged over its heads first. Only valid query
    positions count (``mask`` is ``[B, query]``); padded keys hold zero probability on both sides.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.features import attention_probs_mse

            probs = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
            assert attention_probs_mse(probs, probs).item() == 0.0
    """
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(
            f'attention probabilities must be [batch, heads, query, key], got {tuple(student.shape)} (student) and '
            f'{tuple(teacher.shape)} (teacher).'
        )
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    per_query = (student.float() - teacher.float()).pow(2).mean(dim=(1, 3))
    return mean_over_positions(per_query, mask)


def _features_mse(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    dim = feature_dim(student)
    return logits_mse(student.movedim(dim, -1), teacher.movedim(dim, -1), mask)


def _features_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    dim = feature_dim(student)
    return cosine_distance(student.movedim(dim, -1), teacher.movedim(dim, -1), mask)


#: Feature losses by the names ``FeaturePair(loss=...)`` takes.
FEATURE_LOSSES: dict[str, FeatureLossFn] = {
    'mse': _features_mse,
    'cosine': _features_cosine,
    'attention_map': attention_map_loss,
    'attention_probs': attention_probs_mse,
}
