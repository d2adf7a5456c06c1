"""Run by tests/end_to_end/multiprocess/test_onpolicy_multiprocess.py, alone or under Composer's launcher: on-policy
distillation of a tiny GPT-2 with a global batch of 8 prompts split over however many processes there are.

The student is trained three times: generating greedily, sampling at temperature 1, and on the teacher's greedy
continuations (``source='teacher'``). No kind of continuation depends on how the prompts are split (a sampled one is
seeded by the seed, the step and its prompt). Every row has a prompt of 4 tokens and 4 generated ones, so each
process's loss averages as many tokens and the processes' mean gradient is the single process's. Each rank writes,
per case, the prompts it generated for, the collective calls made while it generated and whether the model that
generated was sharded by FSDP, its parameters gathered (``rank<i>.pt``); rank zero also writes the final student
weights (``results.pt``).

With several processes the worker then trains the same three students sharded by Composer's FSDP (version 2, which
runs on a CPU with gloo), the student's block an FSDP unit of its own (which, left to FSDP, would gather its
parameters in every forward pass) and the teacher sharded too (as under FSDP by default); and it generates with a
teacher sharded by ``fully_shard`` directly, on prompts chosen so that the two ranks stop generating at different
lengths, against the same teacher unsharded.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed
from composer import Trainer
from composer.models import HuggingFaceModel
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from features_parallel_worker import average_in_gloo_reduce_scatter, whole
from tiny_models import tiny_gpt2
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from transformers import GenerationMixin, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from composer_kd import Distillation, KLDivergence, OnPolicy
from composer_kd.parts.onpolicy import gathered_for_generation, generate_continuations, generative_model

GLOBAL_BATCH, VOCAB, PAD, PROMPT = 8, 24, 23, 4
#: The calls of torch.distributed counted while a model generates (FSDP2 gathers with the first).
COLLECTIVES = ('all_gather_into_tensor', 'all_gather', 'all_reduce', 'reduce_scatter_tensor', 'broadcast')
#: The fits: the student generating greedily, sampling, and the teacher generating greedily.
CASES = {
    'greedy': {'temperature': 0.0},
    'sampled': {'temperature': 1.0},
    'teacher_greedy': {'temperature': 0.0, 'source': 'teacher'},
}


def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
    return tiny_gpt2(layers, width, seed, vocab=VOCAB, pad_token_id=PAD)


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(rows)
    return {
        'input_ids': input_ids,
        'attention_mask': torch.ones_like(input_ids),
        'labels': input_ids.clone(),
        'prompt_length': torch.full((len(rows),), PROMPT),
    }


class GenerationProbe:
    """Watches every ``generate`` of a Hugging Face model: the prompts, the calls of :data:`COLLECTIVES` made while it
    runs, and the kind of model that generated: ``(sharded by FSDP, no DTensor among its parameters)``."""

    def __init__(self):
        self.active = False
        self.record = self.new_record()
        for name in COLLECTIVES:
            setattr(torch.distributed, name, self._counted(getattr(torch.distributed, name)))
        generate = GenerationMixin.generate
        probe = self

        def watched(model, *args, **kwargs):
            probe.record['prompts'].extend(kwargs['input_ids'].tolist())
            gathered = not any(isinstance(p, DTensor) for p in model.parameters())
            probe.record['models'].add((isinstance(model, FSDPModule), gathered))
            with probe.counting():
                return generate(model, *args, **kwargs)

        GenerationMixin.generate = watched

    @staticmethod
    def new_record() -> dict[str, Any]:
        return {'prompts': [], 'collectives': 0, 'models': set()}

    def take(self) -> dict[str, Any]:
        """What was seen since the last call."""
        record, self.record = self.record, self.new_record()
        return record

    def _counted(self, function):
        def counted(*args, **kwargs):
            self.record['collectives'] += self.active
            return function(*args, **kwargs)

        return counted

    @contextmanager
    def counting(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, PAD, (32, 10), generator=generator).tolist()
    loader = DataLoader(
        rows,
        batch_size=GLOBAL_BATCH // dist.get_world_size(),
        sampler=dist.get_sampler(rows, shuffle=False),
        collate_fn=collate,
    )
    rank = dist.get_global_rank()
    probe = GenerationProbe()
    results: dict[str, Any] = {'world_size': dist.get_world_size()}
    own: dict[str, Any] = {}
    for name, case in CASES.items():
        results[name] = distil(loader, **case)
        own[name] = probe.take()
    if dist.get_world_size() > 1:
        average_in_gloo_reduce_scatter()  # FSDP2 averages gradients with a reduce-scatter that gloo sums
        for name, case in CASES.items():
            results[f'fsdp_{name}'] = distil(loader, parallelism_config={'fsdp': FSDP2Config()}, **case)
            own[f'fsdp_{name}'] = probe.take()
        own['sharded_teacher'] = sharded_teacher_generation(probe)
    torch.save(own, os.path.join(args.output, f'rank{rank}.pt'))
    if rank == 0:
        torch.save(results, os.path.join(args.output, 'results.pt'))


def on_policy_trainer(loader: DataLoader, duration: str, **options) -> Trainer:
    """A trainer distilling the tiny GPT-2 student on generated sequences (``options``: OnPolicy's ``temperature``
    and ``source``, and the Trainer's)."""
    model = gpt2(1, 16, seed=2)
    # Under FSDP its block is a unit of its own, which reshards after each forward pass unless generation says not.
    model.fsdp_wrap_fn = lambda module: isinstance(module, GPT2Block)
    student = HuggingFaceModel(model, use_logits=True, shift_labels=True)
    on_policy = {key: options.pop(key) for key in ('temperature', 'source') if key in options}
    distillation = Distillation(
        gpt2(2, 32, seed=1),
        KLDivergence(1.0),
        org_loss_weight=0.5,
        kd_loss_weight=0.5,
        on_policy=OnPolicy(fraction=1.0, max_new_tokens=4, **on_policy),
    )
    return Trainer(
        model=student,
        train_dataloader=loader,
        max_duration=duration,
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[distillation],
        device='cpu',
        seed=7,
        progress_bar=False,
        **options,
    )


def distil(loader: DataLoader, **options) -> dict[str, torch.Tensor]:
    """The student's full weights after 3 batches of on-policy distillation with ``options``."""
    trainer = on_policy_trainer(loader, '3ba', **options)
    student = generative_model(trainer.state.model)
    trainer.fit()
    trainer.close()
    assert trainer.state.fsdp_enabled == ('parallelism_config' in options)
    return {k: whole(v) for k, v in student.state_dict().items()}


def sharded_teacher_generation(probe: GenerationProbe) -> dict[str, object]:
    """Continuations of this rank's prompts by a teacher sharded by ``fully_shard`` (its blocks, then the whole
    ``HuggingFaceModel``: the root is outside the generating model), greedy and sampled, and by the same teacher
    unsharded; the forward passes and collective calls made while generating; and what FSDP holds after."""
    teacher = gpt2(2, 32, seed=1).eval()
    options = {'max_new_tokens': 6, 'pad_token_id': PAD, 'seed': 5}
    # Prompts and an end-of-sequence token on which rank 0's continuation ends after one token and rank 1's runs
    # to max_new_tokens: the ranks stop generating at different lengths.
    pool = list(torch.randint(0, PAD, (32, PROMPT), generator=torch.Generator().manual_seed(3)))
    greedy = generate_continuations(teacher, pool, temperature=0.0, eos_token_id=[], **options)
    eos = int(greedy[0][0])
    late = next(i for i, tokens in enumerate(greedy) if eos not in tokens.tolist())
    prompts = [pool[0]] if dist.get_global_rank() == 0 else [pool[late]]
    mesh = init_device_mesh('cpu', (dist.get_world_size(),))
    wrapped = HuggingFaceModel(copy.deepcopy(teacher), use_logits=True)
    for block in wrapped.model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(wrapped, mesh=mesh)
    sharded = generative_model(wrapped, 'teacher')
    groups = [m._get_fsdp_state()._fsdp_param_group for m in (*wrapped.model.transformer.h, wrapped)]
    result: dict[str, object] = {}
    forward_passes = []
    hook = sharded.register_forward_hook(lambda *_: forward_passes.append(1))
    probe.take()
    for temperature in (0.0, 1.0):
        forward_passes.clear()
        with gathered_for_generation(wrapped):
            generated = generate_continuations(sharded, prompts, temperature=temperature, eos_token_id=eos, **options)
        result[f'forward_passes_{temperature}'] = len(forward_passes)
        seen = probe.take()
        result[f'collectives_{temperature}'], result[f'models_{temperature}'] = seen['collectives'], seen['models']
        expected = generate_continuations(teacher, prompts, temperature=temperature, eos_token_id=eos, **options)
        probe.take()
        result[f'generated_{temperature}'] = [t.tolist() for t in generated]
        result[f'expected_{temperature}'] = [t.tolist() for t in expected]
    hook.remove()
    result['all_sharded_after'] = all(isinstance(p, DTensor) for p in wrapped.parameters())
    result['reshard_after_forward'] = [g.post_forward_mesh_info is not None for g in groups]
    result['forward_records'] = len(groups[0].comm_ctx.post_forward_order)
    # The sharded teacher's own forward (gathering unit by unit from its root) still matches the unsharded one.
    batch = {'input_ids': torch.stack(pool[:4])}
    with torch.no_grad():
        result['forward_error'] = float((wrapped(batch).logits - teacher(**batch).logits).abs().max())
    return result


if __name__ == '__main__':
    main()
