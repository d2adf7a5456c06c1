"""Run by tests/end_to_end/multiprocess/test_sharded_teacher.py, alone or under Composer's launcher: distillation with
the student sharded by FSDP (version 2, which runs on a CPU with gloo) when there are several processes, and without
FSDP on one process, over a global batch split between however many processes there are.

Cases: an MLP teacher of a classifier; a GPT-2 teacher (tied embeddings, two blocks) of a GPT-2 student; the same
GPT-2 teacher given as ``{checkpoint: teacher}`` and built on the meta device on every rank but zero; an MPT
teacher built by llm-foundry from a training YAML's ``distillation`` entry with its checkpoint and ``init_device:
mixed``; the MLP teacher kept whole on every rank (``TeacherInference(shard=False)``); the MLP teacher behind a
teacher cache (two epochs); a GPT-2 student distilled from a stored teacher signal. Each rank writes, per case, the
bytes of teacher it held after each batch, the largest difference between the logits of the teacher that ran and
the user's teacher on the rank's first batch, and whether the user's teacher came back unchanged; rank zero also
writes the final student weights.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from composer import Callback, State, Trainer
from composer.loggers import Logger
from composer.models import ComposerClassifier, HuggingFaceModel
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from features_parallel_worker import average_in_gloo_reduce_scatter, whole
from tiny_models import tiny_gpt2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2LMHeadModel
from worker_exit import leave_process_group

from composer_kd import Distillation, IndexedDataset, KLDivergence, TeacherCache, TeacherInference, TeacherSignal
from composer_kd.models.sharding import held_bytes
from composer_kd.models.teachers import teacher_logits
from composer_kd.signal.encoding import decode_signal, encode_signal
from composer_kd.signal.shards import collate_signal

GLOBAL_BATCH = 8
VOCAB = 48


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
    return tiny_gpt2(layers, width, seed, vocab=VOCAB, positions=16)


def loader(dataset: Any, collate=None) -> DataLoader:
    sampler = dist.get_sampler(dataset, shuffle=False)
    return DataLoader(dataset, batch_size=GLOBAL_BATCH // dist.get_world_size(), sampler=sampler, collate_fn=collate)


def classifier_case(shard: bool) -> tuple[nn.Module, nn.Module, Any, DataLoader, Distillation]:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 16, generator=generator), torch.randint(0, 4, (32,), generator=generator))
    teacher = mlp(64, seed=1)
    student = ComposerClassifier(mlp(8, seed=3), num_classes=4)
    distillation = Distillation(teacher, KLDivergence(2.0), 0.5, 0.5, teacher_inference=TeacherInference(shard=shard))
    return teacher, student, teacher, loader(data), distillation


def language_case(meta_elsewhere: bool, output: str) -> tuple[nn.Module, nn.Module, Any, DataLoader, Distillation]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (32, 12), generator=generator)

    def collate(rows):
        ids = torch.stack([row[0] for row in rows])
        return {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}

    if not meta_elsewhere:
        teacher = gpt2(2, 32, seed=1)
        given: Any = teacher
    else:
        # Rank zero writes the teacher's checkpoint; every other rank builds the teacher without weights.
        checkpoint = os.path.join(output, 'teacher.pt')
        if dist.get_global_rank() == 0:
            torch.save(gpt2(2, 32, seed=1).state_dict(), checkpoint)
        dist.barrier()
        if dist.get_global_rank() == 0:
            teacher = gpt2(2, 32, seed=0)  # other weights, replaced by the checkpoint's
        else:
            with torch.device('meta'):
                teacher = gpt2(2, 32, seed=0)
        given = {checkpoint: teacher}
    student = HuggingFaceModel(gpt2(1, 16, seed=2), use_logits=True)
    distillation = Distillation(given, KLDivergence(2.0), 0.5, 0.5)
    return teacher, student, given, loader(TensorDataset(tokens), collate), distillation


def mpt_config(d_model: int, n_layers: int) -> dict[str, Any]:
    return {
        'name': 'mpt_causal_lm', 'd_model': d_model, 'n_heads': 2, 'n_layers': n_layers, 'expansion_ratio': 2,
        'max_seq_len': 12, 'vocab_size': VOCAB, 'attn_config': {'attn_impl': 'torch'},
        'loss_fn': 'torch_crossentropy',
    }  # fmt: skip


def foundry_case(output: str) -> tuple[nn.Module, nn.Module, Any, DataLoader, Distillation]:
    """llm-foundry's route: the distillation entry of a training YAML names an MPT teacher, its checkpoint and
    ``init_device: mixed`` (built with weights on each node's first rank only, on the meta device elsewhere)."""
    from llmfoundry.utils.builders import build_algorithm, build_composer_model

    def mpt(seed: int, **config: Any) -> nn.Module:
        torch.manual_seed(seed)
        return build_composer_model(config.pop('name'), config, tokenizer=None)

    checkpoint = os.path.join(output, 'mpt_teacher.pt')
    if dist.get_global_rank() == 0:
        torch.save(mpt(1, **mpt_config(32, 2)).state_dict(), checkpoint)
    dist.barrier()
    entry = {**mpt_config(32, 2), 'load_path': checkpoint, 'init_device': 'mixed'}
    distillation = build_algorithm('distillation', {'teachers': [entry], 'kd_loss': 'kl', 'kd_loss_weight': 0.5})
    teacher = distillation.teacher_modules[0]
    student = mpt(2, **mpt_config(16, 1))
    tokens = torch.randint(0, VOCAB, (32, 12), generator=torch.Generator().manual_seed(0))
    rows = [{'input_ids': row, 'attention_mask': torch.ones_like(row), 'labels': row.clone()} for row in tokens]
    return teacher, student, entry, loader(rows), distillation


class TeacherRecord(Callback):
    """After each batch: the bytes of teacher this rank holds; after the first, the teacher's logits against the
    user's teacher's on the same batch."""

    def __init__(self, distillation: Distillation, teacher: nn.Module):
        self.distillation, self.teacher = distillation, teacher
        self.held: list[int] = []
        self.logits_difference = None
        self.compared = False

    def batch_end(self, state: State, logger: Logger) -> None:
        runner = self.distillation._fit.runners[0]
        self.held.append(held_bytes(runner.module.parameters()))
        if not self.compared:
            self.compared = True
            with torch.no_grad():
                # Every rank runs the teacher (its forward pass gathers the shards from all of them).
                ran = teacher_logits([runner], state.batch)
                self.held.append(held_bytes(runner.module.parameters()))  # it gave its gathered parameters back
                if all(not p.is_meta for p in self.teacher.parameters()):
                    own = teacher_logits([self.teacher], state.batch)
                    self.logits_difference = float((ran - own).abs().max())


def run_case(name: str, output: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if name in ('mlp', 'replica'):
        teacher, student, _, data, distillation = classifier_case(shard=name == 'mlp')
    elif name == 'foundry':
        teacher, student, _, data, distillation = foundry_case(output)
    else:
        teacher, student, _, data, distillation = language_case(name == 'gpt2_meta', output)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    record = TeacherRecord(distillation, teacher)
    trainer = Trainer(
        model=student,
        train_dataloader=data,
        max_duration='3ba',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[distillation],
        callbacks=[record],
        device='cpu',
        seed=7,
        progress_bar=False,
        parallelism_config={'fsdp': FSDP2Config()} if dist.get_world_size() > 1 else None,
    )
    trainer.fit()
    after = teacher.state_dict()
    unchanged = all(
        type(p) is nn.Parameter and (p.is_meta or torch.equal(p, before[k])) for k, p in teacher.named_parameters()
    ) and set(after) == set(before)
    whole_teacher = {'gpt2': gpt2(2, 32, seed=1), 'gpt2_meta': gpt2(2, 32, seed=1)}.get(name, teacher)
    if name == 'foundry':
        whole_teacher = torch.nn.ParameterList(torch.load(os.path.join(output, 'mpt_teacher.pt')).values())
    rank_record = {
        'held': record.held,
        'full_bytes': held_bytes(whole_teacher.parameters()),
        # FSDP pads each parameter's first dimension to a multiple of the ranks: at most one row more per parameter.
        'padding_bound': sum(p[0].numel() * p.element_size() for p in whole_teacher.parameters()),
        'logits_difference': record.logits_difference,
        'teacher_unchanged': unchanged
        and type(teacher).__name__ in ('Sequential', 'GPT2LMHeadModel', 'ComposerMPTCausalLM'),
    }
    return {k: whole(v) for k, v in student.state_dict().items()}, rank_record


def cache_case() -> tuple[nn.Module, DataLoader, Distillation]:
    """The MLP teacher (sharded) behind a teacher cache: the first epoch records its logits, the second reads them."""
    _, student, _, data, _ = classifier_case(shard=True)
    data = loader(IndexedDataset(data.dataset))
    distillation = Distillation(mlp(64, seed=1), KLDivergence(2.0), 0.5, 0.5, teacher_cache=TeacherCache())
    return student, data, distillation


def signal_case() -> tuple[nn.Module, DataLoader, Distillation]:
    """A GPT-2 student distilled from a stored signal of the GPT-2 teacher (top 8 of 48), no teacher running."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (32, 12), generator=generator)
    with torch.no_grad():
        logits = gpt2(2, 32, seed=1).eval()(tokens).logits
    samples = []
    for row, row_logits in zip(tokens, logits, strict=True):
        values, indices, log_tail = decode_signal(encode_signal(row_logits, k=8))
        samples.append({
            'input_ids': row, 'teacher_topk_indices': indices, 'teacher_topk_logits': values,
            'teacher_log_tail': log_tail, 'teacher_vocab_size': torch.tensor(VOCAB),
        })  # fmt: skip
    student = HuggingFaceModel(gpt2(1, 16, seed=2), use_logits=True, shift_labels=True)
    data = loader(samples, collate_signal)
    return student, data, Distillation(TeacherSignal(), KLDivergence(2.0), 0.5, 0.5)


def fit_case(name: str) -> dict[str, torch.Tensor]:
    """The final student of a case that only trains (``'cache'``, two epochs; ``'signal'``, three batches)."""
    student, data, distillation = cache_case() if name == 'cache' else signal_case()
    trainer = Trainer(
        model=student,
        train_dataloader=data,
        max_duration='2ep' if name == 'cache' else '3ba',
        optimizers=torch.optim.SGD(student.parameters(), lr=0.5),
        algorithms=[distillation],
        device='cpu',
        seed=7,
        progress_bar=False,
        parallelism_config={'fsdp': FSDP2Config()} if dist.get_world_size() > 1 else None,
    )
    trainer.fit()
    return {k: whole(v) for k, v in student.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    args = parser.parse_args()
    average_in_gloo_reduce_scatter()
    weights, records = {}, {}
    for name in ('mlp', 'gpt2', 'gpt2_meta', 'replica', 'foundry'):
        weights[name], records[name] = run_case(name, args.output)
    for name in ('cache', 'signal'):
        weights[name] = fit_case(name)
    torch.save(records, os.path.join(args.output, f'rank{dist.get_global_rank()}.pt'))
    if dist.get_global_rank() == 0:
        torch.save({'world_size': dist.get_world_size(), **weights}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
    leave_process_group()
