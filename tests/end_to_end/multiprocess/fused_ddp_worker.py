"""Run by tests/end_to_end/multiprocess/test_fused_multiprocess.py, alone or under Composer's launcher: fused
distillation of tiny language models with a global batch of 8 rows split over however many processes there are.

Every row is 10 real tokens with every label known, so each process's loss averages as many tokens and the
processes' mean gradient is the single process's. Each case is ``<student>:<parallelism>``:

* students: ``gpt2`` (tied embeddings, its output layer in the root FSDP unit, as Composer wraps it);
  ``gpt2_no_cache`` (the same without its key/value cache, so that the logits are the root's only outputs);
  ``gpt2_head`` and ``llama_head`` (untied embeddings, the output layer marked ``_fsdp_wrap = True``: an FSDP unit
  of its own); ``mpt`` (llm-foundry's untied MPT, which marks its ``lm_head`` so itself); ``gpt2_head_micro``
  (``gpt2_head`` in microbatches of 2 rows);
* parallelism: ``one`` (no wrapper; one process), ``unfused`` (the same without ``fused=``), ``ddp``, ``fsdp``
  (Composer's FSDP version 2, which runs on a CPU with gloo; the teacher sharded too), ``fsdp_replicated`` (FSDP
  with the teacher kept whole on every rank).

Teachers: a GPT-2; for a student whose output layer is its own unit, a GPT-2 whose output layer is one too (under
FSDP each rank holds a shard of the teacher, gathered for its forward pass and for the fused loss); for MPT, an
MPT. Rank zero writes, per case, the final student weights, the first batch's gradient of the output weight (both
gathered whole), whether FSDP held that weight sharded again after the backward pass, and whether a sharded
teacher's output weight was released again by then, to ``<output>/results.pt``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

import torch
from composer import Callback, State, Trainer
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from features_parallel_worker import average_in_gloo_reduce_scatter, whole
from tiny_models import tiny_gpt2, tiny_llama, tiny_mpt
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel

from composer_kd import Distillation, Fused, KLDivergence, TeacherInference

GLOBAL_BATCH, VOCAB = 8, 48


def gpt2(layers: int, width: int, seed: int, tied: bool = True) -> GPT2LMHeadModel:
    return tiny_gpt2(layers, width, seed, vocab=VOCAB, tie_word_embeddings=tied)


def llama(width: int, seed: int) -> Any:
    return tiny_llama(width, seed, vocab=VOCAB)


def mpt(width: int, seed: int) -> Any:
    """llm-foundry's ComposerMPTCausalLM, untied (its ``lm_head`` marked ``_fsdp_wrap = True`` by llm-foundry)."""
    return tiny_mpt(width, seed, vocab=VOCAB)


def student(name: str) -> Any:
    """The Composer model of student ``name``."""
    if name == 'mpt':
        return mpt(16, seed=2)
    if name == 'llama_head':
        network = llama(16, seed=2)
    else:
        network = gpt2(1, 16, seed=2, tied=name in ('gpt2', 'gpt2_no_cache'))
    if name == 'gpt2_no_cache':
        # Its key/value cache is the root unit's only output that requires a gradient besides the logits.
        network.config.use_cache = False
    elif name != 'gpt2':
        network.lm_head._fsdp_wrap = True
    return HuggingFaceModel(network, use_logits=True)


def teacher(name: str) -> Any:
    """The teacher of student ``name``: for a student whose output layer is a unit of its own, a teacher whose output
    layer is one too (which counts where FSDP shards the teacher)."""
    if name == 'mpt':
        return mpt(24, seed=1).model
    if name in ('gpt2', 'gpt2_no_cache'):
        return gpt2(2, 24, seed=1)
    network = gpt2(2, 24, seed=1, tied=False)
    network.lm_head._fsdp_wrap = True
    return network


class FirstGradient(Callback):
    """After the first batch's backward passes: the gradient of the student's output weight, gathered whole, whether
    FSDP holds that weight sharded again (it released the weight the fused loss gathered), and whether the teacher
    that ran is an FSDP-sharded copy whose output weight is released again (``None`` for a teacher kept whole)."""

    def __init__(self, distillation: Distillation):
        self.distillation = distillation
        self.gradient: Optional[torch.Tensor] = None
        self.sharded: Optional[bool] = None
        self.teacher_released: Optional[bool] = None

    def after_backward(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) != 0:
            return
        # After each microbatch: the last holds the batch's whole gradient.
        network = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
        weight = network.model.get_output_embeddings().weight
        self.gradient = whole(weight.grad)
        self.sharded = isinstance(weight, DTensor)
        running = self.distillation._fit.runners[0].module
        if isinstance(running, FSDPModule):
            self.teacher_released = isinstance(running.get_output_embeddings().weight, DTensor)


def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(rows)
    return {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids), 'labels': input_ids.clone()}


def run_case(case: str) -> dict[str, Any]:
    name, parallelism = case.split(':')
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, VOCAB, (24, 10), generator=generator).tolist()
    loader = DataLoader(
        rows,
        batch_size=GLOBAL_BATCH // dist.get_world_size(),
        sampler=dist.get_sampler(rows, shuffle=False),
        collate_fn=collate,
    )
    model = student(name.removesuffix('_micro'))
    distillation = Distillation(
        teacher(name.removesuffix('_micro')),
        KLDivergence(2.0),
        0.5,
        0.5,
        fused=None if parallelism == 'unfused' else Fused(chunk_size=7),
        # Under FSDP the teacher is sharded too, or kept whole.
        **({'teacher_inference': TeacherInference(shard=parallelism == 'fsdp')} if 'fsdp' in parallelism else {}),
    )
    first = FirstGradient(distillation)
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration='3ba',
        optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
        algorithms=[distillation],
        device='cpu',
        seed=7,
        progress_bar=False,
        parallelism_config={'fsdp': FSDP2Config()} if parallelism.startswith('fsdp') else None,
        device_train_microbatch_size=2 if name.endswith('_micro') else None,
        callbacks=[first],
    )
    trainer.fit()
    weights = {k: whole(v) for k, v in model.model.state_dict().items()}
    return {
        'weights': weights,
        'first_gradient': first.gradient,
        'sharded_after_backward': first.sharded,
        'teacher_released': first.teacher_released,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    parser.add_argument('--cases', required=True, help='comma-separated <student>:<parallelism>')
    args = parser.parse_args()
    average_in_gloo_reduce_scatter()
    results = {case: run_case(case) for case in args.cases.split(',')}
    if dist.get_global_rank() == 0:
        torch.save({'world_size': dist.get_world_size(), **results}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
