"""Composer's input-mixing algorithms (``MixUp``, ``CutMix``) beside ``Distillation``: the one setting refused.

Both mix ``state.batch``'s inputs at ``Event.BEFORE_FORWARD``, before ``Distillation`` runs its teachers on that
batch at ``Event.AFTER_LOSS``, so teacher and student see the same mixed input whatever their order in
``algorithms`` (consistent teaching; ``docs/function_matching.md``). With their default ``interpolate_loss=False``
they mix the targets at ``Event.BEFORE_LOSS``, and the model's own loss (``'original'``) is on the mixed targets.
With ``interpolate_loss=True`` they interpolate ``state.loss`` at ``Event.BEFORE_BACKWARD`` instead, which
refuses the dict of terms ``Distillation`` writes there (and would redo only the label term); that setting is
refused when the ``Trainer`` is built, by :func:`refuse_interpolated_loss`.
"""

from __future__ import annotations

from composer.core import State

__all__ = ['MIXING_ALGORITHMS', 'refuse_interpolated_loss']

#: The class names of the algorithms whose ``interpolate_loss=True`` cannot run beside ``Distillation``.
MIXING_ALGORITHMS = ('MixUp', 'CutMix')


def refuse_interpolated_loss(state: State) -> None:
    """Raise ``ValueError`` if the trainer holds ``MixUp`` or ``CutMix`` with ``interpolate_loss=True``.

    Example:
        .. testcode::

            from types import SimpleNamespace
            from composer.algorithms import MixUp
            from composer_kd.parts.mixing import refuse_interpolated_loss

            refuse_interpolated_loss(SimpleNamespace(algorithms=[MixUp(alpha=1.0)]))  # the default composes
            try:
                refuse_interpolated_loss(SimpleNamespace(algorithms=[MixUp(interpolate_loss=True)]))
            except ValueError as e:
                assert 'interpolate_loss=False' in str(e)
    """
    for algorithm in state.algorithms:
        name = type(algorithm).__name__
        if name in MIXING_ALGORITHMS and getattr(algorithm, 'interpolate_loss', False):
            raise ValueError(
                f'{name}(interpolate_loss=True) cannot run beside Distillation: it interpolates state.loss at '
                'Event.BEFORE_BACKWARD, accepts only a tensor there, and would mix only the label term, while '
                "Distillation makes state.loss a dict of terms ('original', 'kd', 'total'). Use "
                f'{name}(interpolate_loss=False), the default: the teacher still answers on the mixed input, and '
                "the label term ('original') is on the mixed targets (or set org_loss_weight=0 to distil only)."
            )
