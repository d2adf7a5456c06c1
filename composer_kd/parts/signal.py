"""A stored teacher signal as the source of the distillation term: no teacher runs."""

from __future__ import annotations

from composer_kd.losses import KLDivergence
from composer_kd.models.outputs import extract_logits, token_mask
from composer_kd.parts.base import FitContext, LossTerms, Source
from composer_kd.signal.distill import TeacherSignal

__all__ = ['StoredSignal', 'check_signal_loss']


def check_signal_loss(kd_loss_fn: object) -> None:
    """Refuse, when ``Distillation`` is built, a loss other than the forward KL a stored signal computes."""
    if not isinstance(kd_loss_fn, KLDivergence):
        raise TypeError(
            'teachers=TeacherSignal(...) computes a forward KL from the stored top-k logits, so kd_loss_fn must '
            f'be a KLDivergence (or the name "kl"), got {type(kd_loss_fn).__name__}.'
        )


class StoredSignal(Source):
    """The term of each microbatch from the teacher signal the batch carries (:class:`~composer_kd.signal.
    TeacherSignal`), at the temperature of the fit's KL; the signal's vocabulary is checked against the student's
    logits once per fit (one host synchronization).

    Args:
        signal (TeacherSignal): The batch keys of the signal.
    """

    def __init__(self, signal: TeacherSignal):
        self.signal = signal
        self._checked = False

    def terms(self, fit: FitContext) -> LossTerms:
        state = fit.state
        student_logits = extract_logits(state.outputs, fit.keys.student_logits_key, role='student')
        if not self._checked:
            self.signal.check_vocabulary(state.batch, student_logits)
            self._checked = True
        kd_loss = self.signal.loss(
            state.batch,
            student_logits,
            fit.kd_loss_fn.temperature,
            mask=token_mask(state.batch, student_logits, causal=fit.causal),
        )
        return LossTerms(state.loss, kd_loss, *fit.plan.weights)
