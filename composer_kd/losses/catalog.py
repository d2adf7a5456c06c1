"""Every loss by name: the names recipes and ``get_loss`` use, AutoMM's aliases, and building a loss from a name."""

from __future__ import annotations

import inspect
from typing import Any, Optional

from torch import nn

from composer_kd.losses.decoupled import DecoupledKD, Standardized
from composer_kd.losses.divergences import (
    CosineDistance,
    JensenShannonDivergence,
    KLDivergence,
    LogitsMSE,
    ReverseKLDivergence,
    SoftCrossEntropy,
)
from composer_kd.losses.generative import GeneralizedJSD, SkewKLDivergence, SkewReverseKLDivergence
from composer_kd.options import did_you_mean

#: Every loss by the name recipes use for it.
LOSSES: dict[str, type[nn.Module]] = {
    'kl': KLDivergence,
    'reverse_kl': ReverseKLDivergence,
    'js': JensenShannonDivergence,
    'soft_ce': SoftCrossEntropy,
    'mse': LogitsMSE,
    'cosine': CosineDistance,
    'gjsd': GeneralizedJSD,
    'skew_kl': SkewKLDivergence,
    'skew_reverse_kl': SkewReverseKLDivergence,
    'dkd': DecoupledKD,
}


def get_loss(name: str, **kwargs) -> nn.Module:
    """Build a loss by name (``'kl'``, ``'reverse_kl'``, ``'js'``, ``'soft_ce'``, ``'mse'``, ``'cosine'``, ``'dkd'``).

    AutoMM's names are accepted too: ``'mean_square_error'`` is ``'mse'`` and ``'cosine_distance'`` is
    ``'cosine'``. ``standardize=True`` wraps the loss in :class:`Standardized` (logit standardization).

    Args:
        name (str): The loss's name.
        **kwargs: Its arguments, e.g. ``temperature=2.0`` (``alpha``, ``beta`` for ``'dkd'``), and
            ``standardize`` (bool, default ``False``).

    Returns:
        nn.Module: The loss.

    Raises:
        ValueError: For an unknown name (the message lists the known ones and suggests the nearest).

    Example:
        .. testcode::

            from composer_kd import get_loss

            loss_fn = get_loss('js', temperature=2.0)
            standardized_kd = get_loss('kl', temperature=2.0, standardize=True)
    """
    standardize = kwargs.pop('standardize', False)
    aliases = LOSS_ALIASES
    key = aliases.get(name, name)
    if key not in LOSSES:
        hint = did_you_mean(name, [*LOSSES, *aliases])
        raise ValueError(
            f'Unknown loss {name!r}; known: {sorted(LOSSES)} (and AutoMM aliases {sorted(aliases)}){hint or "."}'
        )
    loss = LOSSES[key](**kwargs)
    return Standardized(loss) if standardize else loss


#: AutoMM's names for some of :data:`LOSSES`, accepted wherever a loss is named: ``{alias: name in LOSSES}``.
LOSS_ALIASES: dict[str, str] = {'mean_square_error': 'mse', 'cosine_distance': 'cosine', 'kl_divergence': 'kl'}


def canonical_loss_name(name: str) -> Optional[str]:
    """The key of :data:`LOSSES` that ``name`` stands for: itself, or the loss an alias names; ``None`` if unknown.

    Args:
        name (str): A loss name or one of :data:`LOSS_ALIASES`.

    Returns:
        str | None: The name in :data:`LOSSES`, or ``None`` for a name that is neither.

    Example:
        .. testcode::

            from composer_kd.losses import canonical_loss_name

            assert canonical_loss_name('mean_square_error') == 'mse'
            assert canonical_loss_name('kl') == 'kl' and canonical_loss_name('hinge') is None
    """
    key = LOSS_ALIASES.get(name, name)
    return key if key in LOSSES else None


def loss_from_name(name: str, temperature: Optional[float] = None, **options: Any) -> nn.Module:
    """The loss ``name`` names, at ``temperature`` when it is a loss that takes one.

    ``logits_mse`` and ``cosine_distance`` compare raw values, so a temperature is not passed to them; this is how
    a recipe's ``distillation.temperature`` and ``distill(temperature=...)`` apply to any named loss.

    Args:
        name (str): A name of :data:`LOSSES` or one of :data:`LOSS_ALIASES`.
        temperature (float, optional): The softening temperature. Default: ``None``, the loss's own.
        **options: Further arguments of the loss (``alpha``, ``beta`` for ``'dkd'``) and ``standardize``, as
            :func:`get_loss` takes them.

    Returns:
        nn.Module: The loss.

    Raises:
        ValueError: For an unknown name, as :func:`get_loss` does.

    Example:
        .. testcode::

            from composer_kd.losses import KLDivergence, LogitsMSE, loss_from_name

            assert loss_from_name('kl_divergence', temperature=2.0).temperature == 2.0
            assert isinstance(loss_from_name('mse', temperature=2.0), LogitsMSE)
            assert loss_from_name('dkd', temperature=2.0, beta=4.0).temperature == 2.0
    """
    key = canonical_loss_name(name)
    softened = key is not None and 'temperature' in inspect.signature(LOSSES[key]).parameters
    return get_loss(name, **options, **({'temperature': temperature} if softened and temperature is not None else {}))
