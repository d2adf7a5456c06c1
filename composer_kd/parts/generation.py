"""Generating the sequences on-policy distillation trains on, as pure functions of a model, a batch and a seed.

* :func:`is_generated_step` decides which batches are generated, from the seed and the step alone;
* :func:`split_prompts` reads each row's prompt from a batch (a prompt mask or a prompt length);
* :func:`generate_continuations` samples continuations with the KV cache, in eval mode, each prompt's draws seeded
  by the prompt itself (:func:`prompt_seed`), so that they do not depend on the number of processes;
* :func:`on_policy_batch` builds the batch the student then trains on: prompt and continuation, right-padded,
  labels ``-100`` on the prompt and on padding, so that the loss counts the generated tokens only;
* :func:`gathered_for_generation` holds a model's FSDP2-sharded parameters gathered while it generates.

:class:`~composer_kd.parts.onpolicy.OnPolicy` (the option) and its part use them.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from composer.models import HuggingFaceModel
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from composer_kd.losses import IGNORE_INDEX

__all__ = [
    'eos_token_ids',
    'gathered_for_generation',
    'generate_continuations',
    'generative_model',
    'is_generated_step',
    'mixed_seed',
    'on_policy_batch',
    'prompt_seed',
    'split_prompts',
]

# Mixed into the seed so that the draw of generated batches is independent of the draw of sampled teachers.
_DRAW_STREAM = 0x6F6E_706F
_GENERATION_STREAM = 0x6765_6E65


def mixed_seed(*parts: int) -> int:
    """One seed from several integers (a seed, a stream, a step), the same on every rank and in every process.

    Example:
        .. testcode::

            from composer_kd.parts.generation import mixed_seed

            assert mixed_seed(3, 7) == mixed_seed(3, 7) != mixed_seed(7, 3)
    """
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


def is_generated_step(fraction: float, seed: int, step: int) -> bool:
    """Whether the batch of ``step`` trains on generated sequences: true for a share ``fraction`` of steps.

    A pure function of ``(seed, step)``, like :func:`~composer_kd.models.teachers.sample_teachers`: the same on every
    rank, and the same after a resume, with no generator state to checkpoint. ``fraction=0`` never generates and
    ``fraction=1`` always does.

    Args:
        fraction (float): The share of batches to generate, in ``[0, 1]`` (GKD's :math:`\\lambda`).
        seed (int): The run's seed (Composer's ``rank_zero_seed``).
        step (int): The batch index.

    Returns:
        bool: Whether this step's batch is generated.

    Example:
        .. testcode::

            from composer_kd.parts.onpolicy import is_generated_step

            steps = [is_generated_step(0.5, seed=17, step=step) for step in range(1000)]
            assert 400 < sum(steps) < 600
            assert steps == [is_generated_step(0.5, seed=17, step=step) for step in range(1000)]
            assert not any(is_generated_step(0.0, 17, step) for step in range(100))
    """
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    generator = torch.Generator().manual_seed(mixed_seed(seed, _DRAW_STREAM, step))
    return torch.rand((), generator=generator).item() < fraction


def split_prompts(
    batch: Any,
    prompt_mask_key: str = 'prompt_mask',
    prompt_length_key: str = 'prompt_length',
) -> list[torch.Tensor]:
    """Each row's prompt: its first tokens, as many as the batch's prompt length or prompt mask says.

    A row's tokens are its ``input_ids`` where ``attention_mask`` is not 0 (all of them without an attention
    mask), in order, so rows may be padded on either side. ``batch[prompt_length_key]`` (one integer per row)
    gives how many of them form the prompt; otherwise ``batch[prompt_mask_key]`` (the shape of ``input_ids``,
    non-zero on prompt tokens) marks them.

    Args:
        batch (Mapping): A batch with ``input_ids`` and a prompt length or a prompt mask.
        prompt_mask_key (str, optional): The prompt mask's key. Default: ``'prompt_mask'``.
        prompt_length_key (str, optional): The prompt lengths' key, used first. Default: ``'prompt_length'``.

    Returns:
        list[torch.Tensor]: One 1-D tensor of token ids per row, on the batch's device.

    Raises:
        ValueError: If the batch is not a mapping with ``input_ids``, has neither key, or a row's prompt is empty or
            longer than the row.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.onpolicy import split_prompts

            batch = {
                'input_ids': torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
                'attention_mask': torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
                'prompt_length': torch.tensor([3, 1]),
            }
            assert [p.tolist() for p in split_prompts(batch)] == [[5, 6, 7], [9]]
    """
    if not isinstance(batch, Mapping) or not isinstance(batch.get('input_ids'), torch.Tensor):
        raise ValueError(
            'On-policy distillation needs batches that are mappings with input_ids (token ids [batch, sequence]), '
            f'got {type(batch).__name__}.'
        )
    input_ids = batch['input_ids']
    attention_mask = batch.get('attention_mask')
    present = attention_mask != 0 if isinstance(attention_mask, torch.Tensor) else torch.ones_like(input_ids).bool()
    if prompt_length_key in batch:
        lengths = torch.as_tensor(batch[prompt_length_key]).reshape(-1).tolist()
        if len(lengths) != input_ids.shape[0]:
            raise ValueError(
                f"batch['{prompt_length_key}'] holds {len(lengths)} lengths for {input_ids.shape[0]} rows of input_ids."
            )
        rows = [ids[keep] for ids, keep in zip(input_ids, present, strict=True)]
        prompts = []
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            if not 0 < int(length) <= len(row):
                raise ValueError(
                    f"Row {i}: batch['{prompt_length_key}'] is {int(length)}, but a prompt needs at least one token "
                    f'and the row holds {len(row)}.'
                )
            prompts.append(row[: int(length)])
        return prompts
    if prompt_mask_key in batch:
        prompt_mask = batch[prompt_mask_key]
        if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.shape != input_ids.shape:
            shape = tuple(prompt_mask.shape) if isinstance(prompt_mask, torch.Tensor) else type(prompt_mask).__name__
            raise ValueError(
                f"batch['{prompt_mask_key}'] must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}."
            )
        prompts = [ids[keep & (marks != 0)] for ids, keep, marks in zip(input_ids, present, prompt_mask, strict=True)]
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"Row {i}: batch['{prompt_mask_key}'] marks no token as its prompt.")
        return prompts
    raise ValueError(
        'On-policy distillation needs to know where each prompt ends, and this batch says neither: it has no '
        f"'{prompt_length_key}' (prompt tokens per row) and no '{prompt_mask_key}' (non-zero on prompt tokens); its "
        f'keys are {sorted(batch)}. Add one of them in the collate function, or name yours with '
        'OnPolicy(prompt_length_key=...) or OnPolicy(prompt_mask_key=...).'
    )


def on_policy_batch(
    prompts: Sequence[torch.Tensor],
    continuations: Sequence[torch.Tensor],
    pad_token_id: int,
    prompt_length_key: str = 'prompt_length',
) -> dict[str, torch.Tensor]:
    """The batch a student trains on: each prompt followed by its continuation, right-padded.

    ``labels`` are the continuation's tokens and ``-100`` on the prompt and on padding, so both the model's own
    loss and the distillation loss (through :func:`~composer_kd.models.outputs.token_mask`, with the causal shift) count
    exactly the positions that predict a continuation token: from the prompt's last token to the continuation's
    second to last.

    Args:
        prompts (Sequence[torch.Tensor]): One 1-D tensor of token ids per row.
        continuations (Sequence[torch.Tensor]): One 1-D tensor per row, possibly empty.
        pad_token_id (int): The id filling the padding (never counted).
        prompt_length_key (str, optional): Where the prompts' lengths are recorded. Default: ``'prompt_length'``.

    Returns:
        dict[str, torch.Tensor]: ``input_ids``, ``attention_mask`` and ``labels`` ``[batch, longest row]`` and
        the prompt lengths ``[batch]``, on the prompts' device.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.onpolicy import on_policy_batch

            prompts = [torch.tensor([5, 6]), torch.tensor([7])]
            continuations = [torch.tensor([1, 2]), torch.tensor([3])]
            batch = on_policy_batch(prompts, continuations, pad_token_id=0)
            assert batch['input_ids'].tolist() == [[5, 6, 1, 2], [7, 3, 0, 0]]
            assert batch['attention_mask'].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
            assert batch['labels'].tolist() == [[-100, -100, 1, 2], [-100, 3, -100, -100]]
            assert batch['prompt_length'].tolist() == [2, 1]
    """
    if len(prompts) != len(continuations):
        raise ValueError(f'{len(prompts)} prompts but {len(continuations)} continuations.')
    if not prompts:
        raise ValueError('on_policy_batch needs at least one row.')
    device = prompts[0].device
    length = max(len(p) + len(c) for p, c in zip(prompts, continuations, strict=True))
    rows = len(prompts)
    input_ids = torch.full((rows, length), int(pad_token_id), dtype=torch.long, device=device)
    attention_mask = torch.zeros((rows, length), dtype=torch.long, device=device)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long, device=device)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        start, end = len(prompt), len(prompt) + len(continuation)
        input_ids[row, :start] = prompt
        input_ids[row, start:end] = continuation.to(device)
        attention_mask[row, :end] = 1
        labels[row, start:end] = continuation.to(device)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    return {'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels, prompt_length_key: lengths}


def generative_model(model: nn.Module, role: str = 'student') -> nn.Module:
    """The Hugging Face decoder-only language model inside ``model``, the one that can ``generate``.

    DDP's wrapper and Composer's ``HuggingFaceModel`` are looked through: generation runs on the unwrapped module
    (DDP's forward is for the training step, whose gradients it synchronizes).

    Args:
        model (nn.Module): A ``PreTrainedModel``, a ``HuggingFaceModel`` around one, or either inside DDP.
        role (str, optional): ``'student'`` or ``'teacher'``, for the error message. Default: ``'student'``.

    Returns:
        nn.Module: The ``PreTrainedModel``.

    Raises:
        ValueError: If it is not a Hugging Face model that can generate, or is an encoder-decoder.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.onpolicy import generative_model

            try:
                generative_model(torch.nn.Linear(4, 4))
            except ValueError as error:
                assert 'cannot generate' in str(error)
    """
    module = model.module if isinstance(model, DistributedDataParallel) else model
    module = module.model if isinstance(module, HuggingFaceModel) else module
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()  # noqa: N806
    can_generate = isinstance(module, PreTrainedModel) and bool(module.can_generate())
    if not can_generate or getattr(module.config, 'is_encoder_decoder', False):
        kind = 'an encoder-decoder' if can_generate else type(module).__name__
        raise ValueError(
            f'On-policy distillation needs a {role} that generates text: a Hugging Face decoder-only language model '
            f'(a PreTrainedModel such as GPT2LMHeadModel or LlamaForCausalLM, or a Composer HuggingFaceModel around '
            f'one); the {role} is {kind}, which cannot generate continuations of prompts.'
        )
    return module


def _pad_left(prompts: Sequence[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    device = prompts[0].device
    input_ids = torch.full((len(prompts), length), int(pad_token_id), dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = prompt
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids, attention_mask


def _cut_at_end_of_sequence(tokens: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """``tokens`` up to and including the first end-of-sequence token (generation pads what follows)."""
    if not eos_ids or len(tokens) == 0:
        return tokens
    ends = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device)).nonzero()
    return tokens if len(ends) == 0 else tokens[: int(ends[0]) + 1]


def eos_token_ids(model: nn.Module, eos_token_id: Optional[Union[int, Sequence[int]]]) -> list[int]:
    """The ids that end a generated sequence: ``eos_token_id`` when given, else the model's generation config's."""
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, 'eos_token_id', None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


class _PerRowGumbel:
    """Turns greedy decoding into sampling at ``temperature``, each row from its own seeded generator.

    ``argmax(logits / T + g)`` with ``g`` standard Gumbel noise is a draw from ``softmax(logits / T)`` (the
    Gumbel-max trick). Each row draws one noise vector per generated token from a generator seeded by that row
    alone, so a row's continuation does not depend on the other rows it is generated with: not on the batch, the
    number of processes the batch is split over, nor ``rows_per_call``.
    """

    def __init__(self, row_seeds: Sequence[int], temperature: float, device: torch.device):
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in row_seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack(
            [torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))
        return scores.float() / self.temperature + gumbel


def prompt_seed(seed: int, prompt: torch.Tensor) -> int:
    """The sampling seed of one prompt: ``seed`` and the prompt's token ids, whatever row or process it is on.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.onpolicy import prompt_seed

            assert prompt_seed(3, torch.tensor([1, 2])) == prompt_seed(3, torch.tensor([1, 2]))
            assert prompt_seed(3, torch.tensor([1, 2])) != prompt_seed(3, torch.tensor([2, 1]))
    """
    return mixed_seed(seed, _GENERATION_STREAM, zlib.crc32(prompt.detach().to('cpu', torch.int64).numpy().tobytes()))


def generate_continuations(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    pad_token_id: int,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    seed: int = 0,
    rows_per_call: Optional[int] = None,
) -> list[torch.Tensor]:
    """Sample a continuation of each prompt from ``model`` (a Hugging Face causal LM), reproducibly.

    The model runs in eval mode (dropout off) under ``torch.no_grad()`` with its KV cache, and is given back in
    the train/eval modes its modules had. Prompts are left-padded for generation, ``rows_per_call`` at a time
    (to bound the cache's memory, e.g. at the training microbatch size). Sampling draws from the full
    distribution at ``temperature`` (no top-k or top-p truncation); ``temperature=0`` decodes greedily. Each
    prompt's draws come from its own generator, seeded by ``seed`` and the prompt's token ids
    (:func:`prompt_seed`): a prompt's continuation is the same whichever rows, microbatches or processes it is
    generated with, and the global random state is not touched. Each process generates its own rows alone, with
    no collective call, stopping when they end: a model FSDP2 sharded must have its parameters gathered first
    (:func:`gathered_for_generation`).

    Args:
        model (nn.Module): The generating model (see :func:`generative_model`).
        prompts (Sequence[torch.Tensor]): One 1-D tensor of token ids per row, on the model's device.
        max_new_tokens (int): Tokens generated per row at most.
        temperature (float, optional): Sampling temperature; ``0`` for greedy decoding. Default: ``1.0``.
        pad_token_id (int): The padding id.
        eos_token_id (int | Sequence[int], optional): Tokens that end a sequence: a continuation stops after the
            first. Default: the model's generation config's.
        seed (int, optional): Seeds the sampling. Default: ``0``.
        rows_per_call (int, optional): Rows generated together. Default: all.

    Returns:
        list[torch.Tensor]: One 1-D tensor of new tokens per row (ending with an end-of-sequence token, or
        ``max_new_tokens`` long).

    Example:
        .. testcode::

            import torch
            from transformers import GPT2Config, GPT2LMHeadModel
            from composer_kd.parts.onpolicy import generate_continuations

            model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=32, n_embd=16, n_layer=1, n_head=2))
            prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]
            options = dict(max_new_tokens=5, pad_token_id=0, eos_token_id=[], seed=3)
            first = generate_continuations(model, prompts, **options)
            alone = generate_continuations(model, prompts[1:], **options)
            assert [len(c) for c in first] == [5, 5]
            assert torch.equal(first[1], alone[0])  # a prompt's continuation does not depend on the other rows
    """
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise ValueError(f'max_new_tokens must be a positive integer, got {max_new_tokens!r}.')
    from transformers import GenerationConfig, LogitsProcessorList

    sampling = temperature > 0
    # Greedy decoding of scores a processor perturbs: sampling is the Gumbel-max draw of _PerRowGumbel.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=int(pad_token_id),
        eos_token_id=eos_token_ids(model, eos_token_id) or None,
        use_cache=True,
    )
    eos_ids = eos_token_ids(model, eos_token_id)
    step = rows_per_call or len(prompts)
    modes = {name: module.training for name, module in model.named_modules()}
    continuations: list[torch.Tensor] = []
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), step):
                rows = prompts[start : start + step]
                input_ids, attention_mask = _pad_left(rows, pad_token_id)
                processors = LogitsProcessorList()
                if sampling:
                    seeds = [prompt_seed(seed, prompt) for prompt in rows]
                    processors.append(_PerRowGumbel(seeds, float(temperature), input_ids.device))
                # use_model_defaults=False: a model's own generation defaults (top-k, a temperature, a repetition
                # penalty) would change the distribution sampled from. synced_gpus=False: each rank stops when its
                # own rows end; Hugging Face would otherwise keep the ranks of an FSDP-managed model in step, with
                # an all-reduce per token, which a model gathered for generation does not need.
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=processors,
                    use_model_defaults=False,
                    synced_gpus=False,
                )
                continuations.extend(_cut_at_end_of_sequence(row, eos_ids) for row in output[:, input_ids.shape[1] :])
    finally:
        for name, module in model.named_modules():
            module.training = modes.get(name, module.training)
    return continuations


def _fsdp2_modules(module: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_for_generation(module: nn.Module) -> Iterator[nn.Module]:
    """Hold the full parameters of every FSDP2-sharded module inside ``module`` for the duration (a no-op on a
    model FSDP2 has not sharded), so that it generates with no collective call.

    Generation runs a forward pass per new token, and each rank stops when its own rows are done, so ranks run
    different numbers of forward passes: a module that gathered its parameters in each forward (FSDP's default
    for every module but the root) would wait for ranks that have stopped. Here every FSDP2 module is unsharded
    once, all together (one all-gather per module, the same on every rank, so every rank must enter), with
    resharding after forward turned off; on the way out each is resharded (a local operation) and its setting
    restored. The forward passes inside then find their parameters gathered and communicate nothing. While
    inside, every rank holds the whole model's parameters (under FSDP's mixed precision, in its ``param_dtype``).

    FSDP records the order in which its modules finish a forward pass to prefetch in the next backward pass;
    the generation's records are dropped on the way out, so the training step's backward pass sees only its own.
    FSDP chooses its root (the module that keeps its parameters after forward) on the first forward pass; it is
    chosen here first, so that a generation before the first training step cannot make an inner module the root.

    Args:
        module (nn.Module): The whole model as FSDP2 sharded it (the student's ``ComposerModel``, or a teacher),
            or any module FSDP2 has not sharded.

    Yields:
        nn.Module: ``module``, its parameters gathered.

    Example:
        .. testcode::

            import torch
            from composer_kd.parts.onpolicy import gathered_for_generation

            model = torch.nn.Linear(2, 2)
            with gathered_for_generation(model) as gathered:  # not sharded: nothing changes
                assert gathered is model
    """
    sharded = _fsdp2_modules(module)
    if not sharded:
        yield module
        return
    inner = {id(child) for m in sharded for child in m.modules() if child is not m}
    for outermost in (m for m in sharded if id(m) not in inner):
        outermost._get_fsdp_state()._lazy_init()  # a no-op once FSDP has chosen its root
    # torch 2.7 has no public setter for resharding after forward (2.8's set_reshard_after_forward writes this same
    # attribute, and cannot restore a reshard to a smaller group); None means "keep the parameters after forward".
    groups = [(m, m._get_fsdp_state()._fsdp_param_group) for m in sharded]
    groups = [(m, group) for m, group in groups if group is not None]
    saved = [
        (group.post_forward_mesh_info, group.is_unsharded, len(group._post_forward_indices)) for _, group in groups
    ]
    orders = {id(group.comm_ctx): (group.comm_ctx, len(group.comm_ctx.post_forward_order)) for _, group in groups}
    try:
        for m, group in groups:
            group.post_forward_mesh_info = None
            m.unshard()
        yield module
    finally:
        for (m, group), (mesh_info, was_unsharded, records) in zip(groups, saved, strict=True):
            group.post_forward_mesh_info = mesh_info
            del group._post_forward_indices[records:]
            if not was_unsharded:
                m.reshard()
        for comm_ctx, length in orders.values():
            del comm_ctx.post_forward_order[length:]
