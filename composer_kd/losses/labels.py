"""Hard labels that may be hidden: the label of an example without one, and the cross-entropy that skips it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: The label of an example whose label is hidden: losses and metrics skip it, distillation still uses it.
IGNORE_INDEX = -100


def cross_entropy_with_hidden_labels(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over examples whose label is known (not ``IGNORE_INDEX``); 0 when none is.

    ``torch.nn.functional.cross_entropy`` would return NaN for a batch without a single label, which happens
    when a few labelled examples are mixed with many unlabelled ones. Dense targets (e.g. after Composer's
    ``LabelSmoothing``) go to Composer's ``soft_cross_entropy``.

    Args:
        logits (torch.Tensor): ``[batch, classes]`` logits.
        targets (torch.Tensor): ``[batch]`` class indices, ``IGNORE_INDEX`` where hidden; or ``[batch, classes]``
            class probabilities.

    Returns:
        torch.Tensor: The mean cross-entropy over the known labels, a scalar.

    Example:
        .. testcode::

            import torch
            from composer_kd.losses import IGNORE_INDEX, cross_entropy_with_hidden_labels

            logits = torch.zeros(2, 3)
            assert cross_entropy_with_hidden_labels(logits, torch.tensor([IGNORE_INDEX, IGNORE_INDEX])) == 0
    """
    if targets.ndim == logits.ndim:
        # Imported here because this module's own soft_cross_entropy (a distillation loss) holds the name.
        from composer.loss import soft_cross_entropy as composer_soft_cross_entropy

        return composer_soft_cross_entropy(logits, targets)
    known = targets != IGNORE_INDEX
    per_example = F.cross_entropy(logits, targets.clamp(min=0), reduction='none')
    return (per_example * known).sum() / known.sum().clamp(min=1)
