"""Keeping NaN and +inf teacher logits out of training: flagged on the device, acted on once per batch."""

from __future__ import annotations

from typing import Optional

import torch
from composer.core import Event, State
from composer.loggers import Logger

from composer_kd.models.outputs import logits_are_usable
from composer_kd.parts.base import FitContext, Part

__all__ = ['NONFINITE_POLICIES', 'NonFiniteGuard']

#: What may be done about a microbatch whose teacher logits hold NaN or +inf.
NONFINITE_POLICIES = ('raise', 'skip')


class NonFiniteGuard(Part):
    """Screens each microbatch's teacher logits for NaN and +inf, and raises or counts once the batch is done.

    Screening never waits for the device: it leaves a 0-dimensional flag there and gives back logits (and later
    losses) zeroed where the flag is down, so no NaN reaches a gradient either way. The flags are read once per
    batch, in :meth:`settle`, at :attr:`check_event`: before the optimizer step for ``'raise'`` (so the student is
    not updated from them), after it for ``'skip'``, where Composer's own read of the loss has already waited for
    the device (so the check adds no stall). As a part of a fit it handles that one event, and forgets unread
    flags when the fit ends.

    Args:
        policy (str): ``'raise'`` an error naming the batch, or ``'skip'`` the distillation terms of the poisoned
            microbatches and count them. Default: ``'raise'``.
        log_key (str): Where the running count of skipped microbatches is logged. Default:
            ``'distillation/skipped_microbatches'``.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.guard import NonFiniteGuard

            guard = NonFiniteGuard('skip')
            logits, usable = guard.screen(torch.tensor([[1.0, float('nan')]]))
            assert logits.tolist() == [[0.0, 0.0]] and not usable
            assert guard.pending
    """

    def __init__(self, policy: str = 'raise', log_key: str = 'distillation/skipped_microbatches'):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite_teacher must be 'raise' or 'skip', got {policy!r}.")
        self.policy = policy
        self.log_key = log_key
        self.skipped = 0
        # One device flag per screened microbatch of the current batch: were its teacher logits usable?
        self._flags: list[torch.Tensor] = []

    @property
    def check_event(self) -> Event:
        """The event at which :meth:`settle` runs."""
        return Event.AFTER_TRAIN_BATCH if self.policy == 'raise' else Event.BATCH_END

    @property
    def events(self) -> frozenset[Event]:  # type: ignore[override]
        return frozenset({self.check_event})

    def on_event(self, event: Event, fit: FitContext, logger: Logger) -> None:
        self.settle(fit.state, logger)

    def end(self) -> None:
        self.reset()

    @property
    def pending(self) -> bool:
        """Whether microbatches were screened since the last :meth:`settle`."""
        return bool(self._flags)

    def screen(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flag ``logits`` and return them zeroed if unusable, with the flag (a 0-dim bool tensor on their device).

        The result is a new tensor: the teacher's own output, which may be a tensor the user holds, is left as it
        was.
        """
        usable = logits_are_usable(logits)
        self._flags.append(usable)
        return torch.where(usable, logits, 0.0), usable

    @staticmethod
    def mask(loss: torch.Tensor, usable: Optional[torch.Tensor]) -> torch.Tensor:
        """``loss``, or zero where ``usable`` is down (``None``: nothing was screened, the loss stands)."""
        return loss if usable is None else torch.where(usable, loss, 0.0)

    def settle(self, state: State, logger: Logger) -> None:
        """Read this batch's flags (one host synchronization) and raise or count the poisoned microbatches.

        Raises:
            FloatingPointError: With ``'raise'``, if a microbatch's teacher logits held NaN or +inf; the message
                names the batch and the way to skip instead.
        """
        if not self._flags:
            return
        flags, self._flags = self._flags, []
        n_poisoned = len(flags) - int(flags[0] if len(flags) == 1 else torch.stack(flags).sum())
        if not n_poisoned:
            return
        if self.policy == 'raise':
            where = f'batch {int(state.timestamp.batch)} (epoch {int(state.timestamp.epoch)})'
            raise FloatingPointError(
                f'A teacher produced NaN or +inf logits at {where}; the student was not updated from them. '
                "Pass on_nonfinite_teacher='skip' to train on without the distillation terms of such microbatches."
            )
        self.skipped += n_poisoned
        logger.log_metrics({self.log_key: self.skipped})

    def reset(self) -> None:
        """Forget flags left by a batch that did not finish (e.g. a fit that stopped inside it)."""
        self._flags = []
