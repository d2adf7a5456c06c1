"""``Distillation(fused=...)``: language-model distillation in which neither model materializes its logits.

During a training microbatch that distils, the output layer of the student and of each teacher is made to record
its input (the final hidden states) and to return a zero-stride placeholder of the logits' shape instead of the
logits; the student's forward pass is given no labels, so it computes no cross-entropy of its own, and the
student's ``loss`` returns a placeholder. At ``Event.AFTER_LOSS`` the student's cross-entropy and the
distillation term are computed a chunk of tokens at a time by
:func:`composer_kd.losses.fused.fused_linear_distillation`, and the loss dict is written as the unfused path
writes it (``'original'``, ``'kd'``, ``'total'``). Everywhere else (evaluation, prediction, batches outside the
distillation window) the models run untouched and give their normal logits.

How each model kind is handled:

* A Hugging Face causal or masked language model, bare or in Composer's ``HuggingFaceModel`` (including
  llm-foundry's ``ComposerHFCausalLM``): its output layer is ``get_output_embeddings()`` (GPT-2's and Llama's
  ``lm_head``, BERT's ``cls.predictions.decoder``), an ``nn.Linear`` whose weight may be tied to the input
  embedding. Models that transform the logits after that layer (a ``final_logit_softcapping`` or ``logit_scale``
  in their config, e.g. Gemma 2, Cohere) are refused: their logits are not the layer's output.
* llm-foundry's ``ComposerMPTCausalLM`` with an untied output layer (``tie_word_embeddings=False``): its
  ``lm_head``, the same way; the model's own ``loss`` is replaced by the fused loss while distilling. An MPT with
  tied embeddings computes its logits with ``F.linear`` on the embedding's weight, outside any output module, and
  is refused with an error saying so; so is an MPT with ``logit_scale``.
* Anything else (a model whose ``get_output_embeddings()`` gives no ``nn.Linear``, a plain module) is refused at
  fit start with an error naming the model.

Under DDP the weight's gradient is produced in the backward pass and averaged as usual. Under FSDP version 2 an
output layer whose FSDP unit released its gathered weight after the layer's forward pass (the layer wrapped as a
unit of its own, as llm-foundry's untied MPT does, or any unit but the root; a sharded teacher) is gathered again
(``unshard()``) for the fused computation: the student's is released by FSDP after the backward pass, which
reduce-scatters the gradient the fused loss wrote on the whole weight; a teacher's right after the computation.
While the student is sharded by FSDP, its placeholder logits take part in the backward pass (their gradient a
zero-stride zero), so that the hooks FSDP registers on the model's outputs run as they do on real logits: without
them a unit whose only outputs are the logits would not reduce its gradients. A student that FSDP version 1 shards
is refused when the ``Trainer`` is built (a model wrapped by hand, at fit start), naming where its output layer
sits: version 1 gives no whole weight outside a forward pass (a unit of its own releases it; the root unit gives
flattened shards, or on one process views whose gradient it cannot write back).

The models are given back unchanged when the fit ends.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from composer.core import Event, get_precision_context
from composer.loggers import Logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from composer_kd.losses.fused import (
    DenseTeacherChunks,
    SignalTeacherChunks,
    TeacherChunks,
    fused_linear_distillation,
    per_position_terms,
)
from composer_kd.models.outputs import token_mask
from composer_kd.models.teachers import TeacherInference, teacher_logits
from composer_kd.options import given_options, refuse_conflicts
from composer_kd.parts.base import FitContext, LossTerms, Source
from composer_kd.parts.output_layer import OutputLayerCapture, ThroughPlaceholder, output_layer, refuse_fsdp_v1_student

__all__ = [
    'Fused',
    'FusedFit',
    'FusedSource',
    'OutputLayerCapture',
    'check_fused_settings',
    'output_layer',
    'refuse_fsdp_v1_student',
    'resolve_fused',
]


@dataclass(frozen=True)
class Fused:
    """Options of the fused output-layer path, as ``Distillation(fused=Fused(...))`` takes them (or ``True``).

    Args:
        chunk_size (int, optional): Tokens per chunk. Default: ``None``, as many as keep a chunk's logits near
            ``2**21`` elements (65 tokens of a 32,000-entry vocabulary; see
            :func:`~composer_kd.losses.fused.default_chunk_size`).

    Example:
        .. testcode::

            import transformers
            from composer_kd import Distillation, Fused

            config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
            teacher = transformers.GPT2LMHeadModel(config)
            distillation = Distillation(teacher, 'kl', fused=Fused(chunk_size=256))
    """

    chunk_size: Optional[int] = None

    def __post_init__(self):
        valid = self.chunk_size is None or (
            isinstance(self.chunk_size, int) and not isinstance(self.chunk_size, bool) and self.chunk_size > 0
        )
        if not valid:
            raise ValueError(f'Fused(chunk_size=...) must be a positive integer or None, got {self.chunk_size!r}.')


def resolve_fused(fused: Union[None, bool, Fused]) -> Optional[Fused]:
    """``Distillation``'s ``fused=`` argument as options: ``True`` is ``Fused()``, ``None``/``False`` is off.

    Example:
        .. testcode::

            from composer_kd.parts.fused import Fused, resolve_fused

            assert resolve_fused(True) == Fused() and resolve_fused(False) is None
    """
    if fused is None or fused is False:
        return None
    if fused is True:
        return Fused()
    if isinstance(fused, Fused):
        return fused
    raise TypeError(f'fused must be True, False, None or a Fused(...) object, got {type(fused).__name__}.')


def check_fused_settings(
    fused: Optional[Fused],
    kd_loss_fn: nn.Module,
    *,
    feature_pairs: Sequence[Any],
    teacher_cache: Any,
    on_policy: Any,
    on_nonfinite_teacher: str,
    teacher_compiled: bool,
    student_logits_key: Any,
) -> None:
    """Refuse, when ``Distillation`` is built, a loss the fused path does not compute and the settings it does not
    combine with (as :data:`composer_kd.options.CONFLICTS` lists them)."""
    if fused is None:
        return
    per_position_terms(kd_loss_fn)
    refuse_conflicts(
        given_options(
            fused=fused,
            feature_pairs=feature_pairs,
            teacher_cache=teacher_cache,
            on_policy=on_policy,
            on_nonfinite_teacher=on_nonfinite_teacher,
            teacher_inference=TeacherInference(compile=teacher_compiled),
            student_logits_key=student_logits_key,
        )
    )


def _shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Row ``i``'s target in a causal LM is token ``i + 1``; the last position predicts nothing (-100)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


class FusedSource(Source):
    """The fused path during one fit: the captures installed on student and teachers, and each distilling
    microbatch's loss computed from the recorded hidden states at ``Event.AFTER_LOSS``.

    At ``Event.BEFORE_FORWARD`` the student's capture is switched on for the microbatches that distil; the terms
    come with the total that :func:`~composer_kd.losses.fused.fused_linear_distillation` computed, which carries the
    gradients.

    Args:
        options (Fused): The options.
        fit (FitContext): The fit (its state at the fit's start, its running teachers and its loss).
    """

    events = frozenset({Event.BEFORE_FORWARD})

    def __init__(self, options: Fused, fit: FitContext):
        per_position_terms(fit.kd_loss_fn)  # refuses a loss the fused path does not compute
        state = fit.state
        self.options = options
        self._signal_checked = False
        composer_model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
        self._composer_model = composer_model
        self.student = OutputLayerCapture(state.model, 'student')
        self.teachers = [
            OutputLayerCapture(r.module, f'teachers[{i}]', training_only=False) for i, r in enumerate(fit.runners)
        ]
        vocab = self.student.layer.out_features
        for i, capture in enumerate(self.teachers):
            if capture.layer.out_features != vocab:
                raise ValueError(
                    f'teachers[{i}] has a vocabulary of {capture.layer.out_features} entries, the student '
                    f'{vocab}: fused=... needs one shared vocabulary.'
                )
        # Training metrics would be computed on the placeholder logits: they are set aside for the fit (with a
        # warning) and given back at its end. Evaluation metrics see normal logits.
        self._state = state
        self._train_metrics = state.train_metrics
        if state.train_metrics:
            warnings.warn(
                f'fused=... makes no training logits, so the training metrics {sorted(state.train_metrics)} are not '
                'computed during this fit; evaluation metrics are, on normal logits.',
                stacklevel=2,
            )
            state.train_metrics = {}
        for capture in (self.student, *self.teachers):
            capture.install()
        # While distilling, the model's own loss is the fused one: a placeholder until AFTER_LOSS replaces it.
        original_loss = type(composer_model).loss.__get__(composer_model)

        def loss(outputs: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
            if self.student.on:
                return torch.zeros((), device=self.student.layer.weight.device)
            return original_loss(outputs, batch, *args, **kwargs)

        composer_model.loss = loss

    def on_event(self, event: Event, fit: FitContext, logger: Logger) -> None:
        self.student.on = bool(fit.plan.active)

    def terms(self, fit: FitContext) -> LossTerms:
        """This microbatch's terms from the recorded hidden states; the captures are switched off.

        Output layers whose FSDP (version 2) unit released their weight after its forward pass are gathered for the
        computation: the teachers' released right after it; the student's stays gathered for the backward pass,
        where the gradient lands on the whole weight and FSDP reduce-scatters it and releases the weight (as after
        the layer's own backward pass).
        """
        state = fit.state
        self.student.on = False
        student_hidden = self.student.take()
        placeholder = self._placeholder(state.outputs)
        labels = state.batch.get('labels') if isinstance(state.batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and labels.shape == placeholder.shape[:-1]:
            labels = (_shifted_labels(labels) if fit.causal else labels).reshape(-1)
        else:
            labels = None
        mask = token_mask(state.batch, placeholder, causal=fit.causal)
        org_loss_weight, kd_loss_weight = fit.plan.weights
        gathered: list[nn.Module] = []
        try:
            teacher = self._teacher_chunks(fit, placeholder, gathered)
            self.student.gather()
            with get_precision_context(state.precision, state.precision_config):
                fused = fused_linear_distillation(
                    student_hidden,
                    self.student.layer.weight,
                    teacher,
                    labels=labels,
                    kd_mask=None if mask is None else mask.reshape(-1),
                    loss_fn=fit.kd_loss_fn,
                    temperature=fit.kd_loss_fn.temperature,
                    student_bias=self.student.layer.bias,
                    org_loss_weight=org_loss_weight,
                    kd_loss_weight=kd_loss_weight,
                    chunk_size=self.options.chunk_size,
                )
        finally:
            for unit in gathered:  # releasing needs no communication between the ranks
                unit.reshard()
        if not bool(torch.isfinite(fused.kd)):  # one host synchronization per microbatch
            raise RuntimeError(
                f'The distillation loss is not finite at batch {int(state.timestamp.batch)}: a teacher gave NaN or '
                '+inf logits (or the student diverged).'
            )
        total = fused.total
        if placeholder.requires_grad:
            # Under FSDP the backward pass must reach the placeholder logits, whose hooks start FSDP's backward
            # (the root unit's gradients are reduced only then); their gradient is a zero-stride zero.
            total = ThroughPlaceholder.apply(total, placeholder)
        return LossTerms(fused.original, fused.kd, org_loss_weight, kd_loss_weight, total=total)

    def _teacher_chunks(self, fit: FitContext, placeholder: torch.Tensor, gathered: list[nn.Module]) -> TeacherChunks:
        """The teacher side of the loop: the batch's stored signal, or the active teachers' final hidden states
        (each FSDP unit gathered for an output layer is added to ``gathered``)."""
        if fit.signal is not None:
            if not self._signal_checked:  # one host synchronization per fit
                fit.signal.check_vocabulary(fit.state.batch, placeholder)
                self._signal_checked = True
            indices, logits, log_tail = fit.signal.fields(fit.state.batch, placeholder.device)
            k = indices.shape[-1]
            return SignalTeacherChunks(
                indices.reshape(-1, k), logits.reshape(-1, k), log_tail.reshape(-1), placeholder.shape[-1]
            )
        active = fit.plan.active
        hidden = [self._teacher_hidden(fit, index) for index in active]
        for index in active:
            unit = self.teachers[index].gather()
            if unit is not None:
                gathered.append(unit)
        return DenseTeacherChunks(
            hidden,
            [self.teachers[i].layer.weight for i in active],
            [self.teachers[i].layer.bias for i in active],
        )

    def _teacher_hidden(self, fit: FitContext, index: int) -> torch.Tensor:
        """Run teacher ``index`` with its capture on, and take its final hidden states."""
        capture = self.teachers[index]
        capture.on = True
        try:
            teacher_logits(
                [fit.runners[index]],
                fit.state.batch,
                teacher_indices=[index],
                input_key=fit.keys.input_key,
                logits_key=fit.keys.teacher_logits_key,
                precision=fit.state.precision,
                precision_config=fit.state.precision_config,
            )
        finally:
            capture.on = False
        return capture.take()

    def _placeholder(self, outputs: Any) -> torch.Tensor:
        logits = outputs.get('logits') if isinstance(outputs, Mapping) else getattr(outputs, 'logits', None)
        if logits is None and isinstance(outputs, (tuple, list)) and outputs:
            logits = outputs[0]
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
            raise ValueError(
                f"fused=... expects the student's output to hold [batch, sequence, vocabulary] logits, got "
                f'{type(outputs).__name__}.'
            )
        return logits

    def end(self) -> None:
        for capture in (self.student, *self.teachers):
            capture.remove()
        self._composer_model.__dict__.pop('loss', None)
        if self._train_metrics:
            self._state.train_metrics = self._train_metrics


#: The fused source under its former name.
FusedFit = FusedSource
