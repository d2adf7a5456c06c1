"""On-policy distillation of causal language models: training on sequences the student (or the teacher) generates.

A student trained only on fixed text learns the teacher's next token on prefixes of that text, not on the
prefixes it produces itself when it generates; its errors then compound (exposure bias). On-policy distillation
(Generalized Knowledge Distillation, Agarwal et al., 2024; MiniLLM; DistiLLM) lets the student continue the
batch's prompts and has the teacher score every generated token, so the loss is taken where the student goes.
Sequence-level distillation (Kim and Rush, 2016) trains on the teacher's continuations instead.

:class:`OnPolicy` is the option :class:`~composer_kd.Distillation` takes as ``on_policy=``, and :class:`OnPolicyFit`
its part in a fit; the generation itself is pure functions in :mod:`composer_kd.parts.generation` (imported here
too, by their former path).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from composer.core import Event, State, get_precision_context
from composer.loggers import Logger
from torch import nn

from composer_kd.parts.base import FitContext, LossTerms, Part
from composer_kd.parts.generation import (
    eos_token_ids,
    gathered_for_generation,
    generate_continuations,
    generative_model,
    is_generated_step,
    mixed_seed,
    on_policy_batch,
    prompt_seed,
    split_prompts,
)
from composer_kd.schedules import Schedule, ScheduleOrValue, value_at

__all__ = [
    'OnPolicy',
    'OnPolicyFit',
    'gathered_for_generation',
    'generate_continuations',
    'generative_model',
    'is_generated_step',
    'prompt_seed',
    'on_policy_batch',
    'split_prompts',
]

#: Where a generated batch's continuations come from: the student (on-policy) or the teacher (sequence-level).
SOURCES = ('student', 'teacher')


@dataclass
class OnPolicy:
    """Train a causal language model on sequences it generates itself, scored token by token by the teacher.

    Given to :class:`~composer_kd.Distillation` as ``on_policy=``. For a share ``fraction`` of training batches
    (GKD's :math:`\\lambda`; which ones is a function of the seed and the step, see :func:`is_generated_step`), the
    student continues each row's prompt (see :func:`split_prompts`) by sampling ``max_new_tokens`` tokens at
    ``temperature`` with its KV cache, in eval mode, before the batch reaches the trainer; the batch is replaced by
    prompt + continuation (see :func:`on_policy_batch`), and the student's forward pass, the teachers and the
    distillation loss all see that sequence, the loss counting the generated tokens only. Other batches train on
    the dataset's own continuations, untouched (``fraction=0`` is plain distillation, exactly).

    With ``source='teacher'`` the first teacher generates instead (sequence-level distillation); with
    ``cache_teacher_sequences=True`` each prompt's continuation is generated once and reused in later epochs (the
    cache is kept in the algorithm's checkpoint state).

    On batches the student generated, the model's own loss (its cross-entropy on its own samples, which teaches it
    nothing about the teacher) enters the total with weight 0 unless ``org_loss_on_student_samples`` is set; on
    teacher-generated batches it is kept at ``org_loss_weight``: it is sequence-level distillation's objective.

    Generation runs per rank on that rank's batch (under DDP, on the unwrapped module; under FSDP version 2, with
    the generating model's parameters gathered for the batch's generation, see :func:`gathered_for_generation`),
    ``device_train_microbatch_size`` rows at a time, under the trainer's precision. FSDP version 1 is refused when
    the ``Trainer`` is built. Evaluation never generates. Each prompt's sampling is seeded by
    the seed, the step and the prompt's tokens (not the rank), so a resumed run generates what the uninterrupted
    run did, and the continuations are the same however the batch is split over processes and microbatches.

    Args:
        fraction (float | Schedule, optional): Share of batches trained on generated sequences, in ``[0, 1]``, or
            a schedule of it. Default: ``1.0``.
        source (str, optional): ``'student'`` (on-policy) or ``'teacher'`` (sequence-level). Default: ``'student'``.
        max_new_tokens (int, optional): Tokens generated per prompt at most. Default: ``32``.
        temperature (float, optional): Sampling temperature, ``>= 0``; ``0`` decodes greedily. Default: ``1.0``.
        prompt_length_key (str, optional): The batch key holding each row's prompt length. Default:
            ``'prompt_length'``.
        prompt_mask_key (str, optional): The batch key of a mask, non-zero on prompt tokens, used when there is no
            prompt length. Default: ``'prompt_mask'``.
        pad_token_id (int, optional): Padding id of generated batches. Default: the generating model's
            ``pad_token_id`` (or its end-of-sequence id).
        eos_token_id (int | list[int], optional): Tokens that end a continuation. Default: the generating model's.
        cache_teacher_sequences (bool, optional): With ``source='teacher'``, generate each prompt's continuation
            once. Default: ``False``.
        org_loss_on_student_samples (bool, optional): Keep the model's own loss on student-generated batches.
            Default: ``False``.

    Example:
        .. testcode::

            from transformers import GPT2Config, GPT2LMHeadModel
            from composer_kd import Distillation, GeneralizedJSD, OnPolicy

            teacher = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=64, n_embd=16, n_layer=1, n_head=2))
            distillation = Distillation(
                teacher,
                kd_loss_fn=GeneralizedJSD(beta=0.5),
                org_loss_weight=0.0,
                on_policy=OnPolicy(fraction=0.5, max_new_tokens=16, temperature=1.0),
            )
    """

    fraction: ScheduleOrValue = 1.0
    source: str = 'student'
    max_new_tokens: int = 32
    temperature: float = 1.0
    prompt_length_key: str = 'prompt_length'
    prompt_mask_key: str = 'prompt_mask'
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None
    cache_teacher_sequences: bool = False
    org_loss_on_student_samples: bool = False
    teacher_sequences: dict[tuple[int, ...], list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        low, high = self.fraction.bounds if isinstance(self.fraction, Schedule) else (self.fraction,) * 2
        for value in (low, high):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(
                    f'OnPolicy fraction (the share of batches trained on generated sequences) must lie in [0, 1], '
                    f'got {self.fraction!r}.'
                )
        if self.source not in SOURCES:
            raise ValueError(
                f"OnPolicy source must be 'student' (on-policy) or 'teacher' (sequence-level), got {self.source!r}."
            )
        if not (isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)):
            raise ValueError(f'OnPolicy max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.')
        if self.max_new_tokens <= 0:
            raise ValueError(f'OnPolicy max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.')
        temperature_ok = isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
        if not (temperature_ok and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f'OnPolicy temperature must be >= 0 (0: greedy), got {self.temperature!r}.')
        if self.cache_teacher_sequences and self.source != 'teacher':
            raise ValueError(
                "OnPolicy cache_teacher_sequences=True needs source='teacher': the student's own samples change as "
                'it trains, and reusing them would no longer be on-policy.'
            )

    def start(self, state: State, teachers: Sequence[nn.Module], log_prefix: str = 'distillation') -> OnPolicyFit:
        """Check the student (and, for ``source='teacher'``, the first teacher) and begin a fit.

        Args:
            state (State): The trainer's state at the fit's start.
            teachers (Sequence[nn.Module]): The teachers as they run (placed, frozen).
            log_prefix (str, optional): Prefix of the logged values. Default: ``'distillation'``.

        Returns:
            OnPolicyFit: The part that replaces the batches during this fit.

        Raises:
            ValueError: For a student or teacher that cannot generate.
        """
        student = generative_model(state.model, 'student')
        # The whole model (Composer's model, or the teacher as it runs) is what FSDP2 shards, its outermost
        # sharded module being FSDP's root: generation gathers all of it (see gathered_for_generation).
        holder = teachers[0] if self.source == 'teacher' else state.model
        generator = generative_model(holder, 'teacher') if self.source == 'teacher' else student
        return OnPolicyFit(self, generator, student, log_prefix, sharded=holder)

    def check(self, state: State, teachers: Sequence[nn.Module]) -> None:
        """Refuse, when the trainer is built, a student (or generating teacher) that cannot generate, a second
        algorithm of the trainer that also replaces batches with generated ones, and FSDP version 1 (before it wraps
        the model).

        Args:
            state (State): The trainer's state at ``Event.INIT``.
            teachers (Sequence[nn.Module]): The teachers, as given.
        """
        generating = [a for a in state.algorithms if isinstance(getattr(a, 'on_policy', None), OnPolicy)]
        if len(generating) > 1:
            raise ValueError(
                f'{len(generating)} algorithms of this Trainer have on_policy set; each would replace the batch with '
                'its own generations. Give on_policy to one of them.'
            )
        if getattr(state, 'fsdp_config_version', 0) == 1:
            # FSDP version 1 gathers a unit's parameters only inside that unit's own forward, and no forward pass may
            # start inside its summon_full_params: generation cannot run on its sharded modules.
            raise ValueError(
                'On-policy distillation does not run under FSDP version 1 (parallelism_config={"fsdp": '
                'FSDPConfig(...)} or a dict of its options): it cannot generate with the sharded model, FSDP version 1 '
                'forbidding a forward pass while its full parameters are held. Use FSDP version 2 '
                '(parallelism_config={"fsdp": FSDP2Config()}, from composer.utils.parallelism), which gathers the '
                'parameters once per generated batch, or DDP.'
            )
        generative_model(state.model, 'student')
        if self.source == 'teacher':
            generative_model(teachers[0], 'teacher')

    def state_dict(self) -> dict[str, Any]:
        """The teacher's cached continuations (empty unless ``cache_teacher_sequences``)."""
        return {'teacher_sequences': [[list(k), v] for k, v in self.teacher_sequences.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.teacher_sequences = {tuple(k): list(v) for k, v in state.get('teacher_sequences', [])}


def _pad_id(model: nn.Module, options: OnPolicy) -> int:
    for candidate in (
        options.pad_token_id,
        getattr(model.config, 'pad_token_id', None),
        getattr(model.generation_config, 'pad_token_id', None),
        *eos_token_ids(model, options.eos_token_id)[:1],
    ):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        'On-policy distillation needs a padding id for generated batches, and the model names none (no '
        'pad_token_id, no eos_token_id in its config): pass OnPolicy(pad_token_id=...).'
    )


def _position_limit(model: nn.Module) -> Optional[int]:
    # Learned position embeddings (GPT-2) fail beyond their table; rotary ones (Llama) do not, so only a model
    # whose config names n_positions is held to it.
    return getattr(model.config, 'n_positions', None)


class OnPolicyFit(Part):
    """One fit's on-policy generation, a part of the fit: decides each batch, generates, replaces ``state.batch``.

    Built by :meth:`OnPolicy.start`. At ``Event.AFTER_DATALOADER`` (before Composer splits the batch into
    microbatches and before the student's forward pass) it runs :meth:`prepare_batch` for the batches the fit's
    plan distils; on a distilling microbatch it sets the weight of the model's own loss
    (:meth:`org_loss_weight`).

    Args:
        options (OnPolicy): The settings (and the teacher-sequence cache).
        generator (nn.Module): The model that generates (the student, or the first teacher).
        student (nn.Module): The student's ``PreTrainedModel``.
        log_prefix (str): Prefix of the logged values.
        sharded (nn.Module, optional): The whole model around ``generator`` as FSDP2 may have sharded it, gathered
            while generating (see :func:`gathered_for_generation`). Default: ``generator``.
    """

    EVENT = Event.AFTER_DATALOADER
    events = frozenset({EVENT})

    def __init__(
        self,
        options: OnPolicy,
        generator: nn.Module,
        student: nn.Module,
        log_prefix: str,
        sharded: Optional[nn.Module] = None,
    ):
        self.options = options
        self.generator = generator
        self.sharded = generator if sharded is None else sharded
        self.student = student
        self.pad_token_id = _pad_id(generator, options)
        self.log_prefix = log_prefix
        #: Whether the current batch was generated by the student (its own loss is then weighted 0).
        self.student_generated = False

    def on_event(self, event: Event, fit: FitContext, logger: Logger) -> None:
        self.prepare_batch(fit.state, logger, distilling=bool(fit.plan.teachers_for_batch(fit.state)))

    def adjust(self, terms: LossTerms, fit: FitContext) -> None:
        # The student's loss on its own samples teaches it nothing about the teacher: not trained on by default.
        terms.org_loss_weight = self.org_loss_weight(terms.org_loss_weight)

    def org_loss_weight(self, weight: float) -> float:
        """The weight of the model's own loss on the current batch, given the one in force."""
        if self.student_generated and not self.options.org_loss_on_student_samples:
            return 0.0
        return weight

    def prepare_batch(self, state: State, logger: Logger, distilling: bool) -> None:
        """Replace ``state.batch`` by a generated batch if this step is chosen (and distillation is on).

        Args:
            state (State): The trainer's state, holding the dataloader's batch.
            logger (Logger): Receives ``<prefix>/generated`` (1 or 0) and ``<prefix>/generation_seconds``.
            distilling (bool): Whether distillation is active at this batch (inside its window).
        """
        step = int(state.timestamp.batch)
        fraction = value_at(self.options.fraction, state)
        generate = distilling and is_generated_step(fraction, state.rank_zero_seed, step)
        self.student_generated = generate and self.options.source == 'student'
        if not generate:
            logger.log_metrics({f'{self.log_prefix}/generated': 0.0})
            return
        began = time.perf_counter()
        batch = state.device.batch_to_device(state.batch)
        prompts = split_prompts(batch, self.options.prompt_mask_key, self.options.prompt_length_key)
        limit = _position_limit(self.generator)
        longest = max(len(p) for p in prompts)
        if limit is not None and longest + self.options.max_new_tokens > limit:
            raise ValueError(
                f'A prompt of {longest} tokens plus max_new_tokens={self.options.max_new_tokens} exceeds the '
                f"{self.options.source}'s {limit} positions: shorten the prompts or max_new_tokens."
            )
        seed = mixed_seed(state.rank_zero_seed, step)  # the same on every rank: each prompt seeds its own draws
        microbatch = state.device_train_microbatch_size
        rows_per_call = int(microbatch) if isinstance(microbatch, (int, float)) and microbatch >= 1 else None
        # Every rank enters (whether a step generates is the same on all): under FSDP2 the gathering is collective,
        # even for a rank whose prompts are all in the teacher-sequence cache.
        with gathered_for_generation(self.sharded), get_precision_context(state.precision, state.precision_config):
            continuations = self._continuations(prompts, seed, rows_per_call)
        state.batch = on_policy_batch(prompts, continuations, self.pad_token_id, self.options.prompt_length_key)
        seconds = time.perf_counter() - began
        logger.log_metrics({f'{self.log_prefix}/generated': 1.0, f'{self.log_prefix}/generation_seconds': seconds})

    def _continuations(
        self, prompts: list[torch.Tensor], seed: int, rows_per_call: Optional[int]
    ) -> list[torch.Tensor]:
        options = self.options

        def generate(rows: list[torch.Tensor]) -> list[torch.Tensor]:
            return generate_continuations(
                self.generator,
                rows,
                max_new_tokens=options.max_new_tokens,
                temperature=options.temperature,
                pad_token_id=self.pad_token_id,
                eos_token_id=options.eos_token_id,
                seed=seed,
                rows_per_call=rows_per_call,
            )

        if not options.cache_teacher_sequences:
            return generate(prompts)
        cache = options.teacher_sequences
        keys = [tuple(p.tolist()) for p in prompts]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            for i, continuation in zip(missing, generate([prompts[i] for i in missing]), strict=True):
                cache[keys[i]] = continuation.tolist()
        device = prompts[0].device
        return [torch.tensor(cache[key], dtype=torch.long, device=device) for key in keys]
