""":class:`TeacherSignal`: what :class:`~composer_kd.Distillation` takes in place of teachers to distil from a
stored signal that the batches carry (see :func:`~composer_kd.signal.shards.collate_signal`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from composer_kd.losses.signal import signal_kl

__all__ = ['TeacherSignal']


@dataclass(frozen=True)
class TeacherSignal:
    """Distil from the teacher signal in each batch instead of running teachers.

    Give it as ``Distillation(teachers=TeacherSignal())``: no teacher is loaded, and the distillation term of a
    microbatch is :func:`~composer_kd.losses.signal.signal_kl` between the student's logits and the batch's stored
    top-k logits and tail mass, at the temperature of ``kd_loss_fn`` (which must be a forward KL,
    :class:`~composer_kd.KLDivergence`), masked and shifted as for any causal LM. The batch keys are named here.

    Args:
        indices_key (str, optional): Batch key of the ``[B, L, k]`` kept classes. Default: ``'teacher_topk_indices'``.
        logits_key (str, optional): Key of their ``[B, L, k]`` logits. Default: ``'teacher_topk_logits'``.
        log_tail_key (str, optional): Key of the ``[B, L]`` log dropped mass. Default: ``'teacher_log_tail'``.
        vocab_size_key (str, optional): Key of the ``[B]`` vocabulary size the signal was written with, checked
            once against the student's logits. Default: ``'teacher_vocab_size'``.

    Example:
        .. testcode::

            from composer_kd import Distillation, KLDivergence
            from composer_kd.signal import TeacherSignal

            algorithm = Distillation(TeacherSignal(), KLDivergence(temperature=2.0))
    """

    #: Marks a stored signal given in place of teachers (:func:`composer_kd.options.given_options` reads it).
    stored_signal: ClassVar[bool] = True

    indices_key: str = 'teacher_topk_indices'
    logits_key: str = 'teacher_topk_logits'
    log_tail_key: str = 'teacher_log_tail'
    vocab_size_key: str = 'teacher_vocab_size'

    def _entry(self, batch: Any, key: str) -> torch.Tensor:
        value = batch.get(key) if isinstance(batch, Mapping) else None
        if not isinstance(value, torch.Tensor):
            present = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(
                f'Distilling from a TeacherSignal needs the batch key {key!r} (a tensor), but the batch has '
                f'{present}. Feed the trainer from SignalDataset with collate_signal (or the teacher_signal '
                'dataloader of llm-foundry).'
            )
        return value

    def check_vocabulary(self, batch: Any, student_logits: torch.Tensor) -> None:
        """Refuse a signal written with another vocabulary than the student's logits (one host sync)."""
        sizes = self._entry(batch, self.vocab_size_key)
        vocab = student_logits.shape[-1]
        if int(sizes.max()) != vocab or int(sizes.min()) != vocab:
            raise ValueError(
                f'The teacher signal was written with a vocabulary of {int(sizes.max())} classes, but the '
                f"student's logits have {vocab}: teacher and student must share one tokenizer."
            )

    def fields(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's ``[..., k]`` kept classes and their logits and its ``[...]`` log tail mass, on ``device``."""
        return tuple(
            self._entry(batch, key).to(device) for key in (self.indices_key, self.logits_key, self.log_tail_key)
        )  # type: ignore[return-value]

    def loss(
        self, batch: Any, student_logits: torch.Tensor, temperature: float, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The distillation term of a microbatch: the masked mean of the per-position KL."""
        return signal_kl(student_logits, *self.fields(batch, student_logits.device), temperature, mask)
