"""Run by tests/end_to_end/multiprocess/test_signal_multiprocess.py under Composer's launcher: two processes distil from one
folder of teacher-signal shards; each records the sequences it was given, rank zero writes them all."""

from __future__ import annotations

import argparse
import os

import torch
from composer import Callback, Trainer
from composer.devices import DeviceCPU
from composer.models import HuggingFaceModel
from composer.utils import dist
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from composer_kd import Distillation, KLDivergence, TeacherSignal
from composer_kd.signal.shards import SignalDataset, collate_signal
from composer_kd.signal.writer import write_teacher_signal


def gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))


class Record(Callback):
    def __init__(self):
        self.first_tokens: list[int] = []
        self.kd: list[float] = []

    def after_loss(self, state, logger):
        self.first_tokens += state.batch['input_ids'][:, 0].tolist()
        self.kd.append(float(state.loss['kd']))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    args = parser.parse_args()
    shards = os.path.join(args.output, 'signal')
    dist.initialize_dist(DeviceCPU())
    if dist.get_global_rank() == 0:
        # Sequence i starts with token i, so the first tokens say which sequences a process read.
        tokens = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))
        tokens[:, 0] = torch.arange(16)
        write_teacher_signal(gpt2(0), tokens, shards, k=4, sequences_per_part=5, progress=False)
    dist.barrier()
    dataset = SignalDataset(local=shards, vocab_size=64, shuffle=True, shuffle_seed=1, batch_size=2)
    record = Record()
    student = HuggingFaceModel(gpt2(1), use_logits=True, shift_labels=True)
    trainer = Trainer(
        model=student,
        train_dataloader=DataLoader(dataset, batch_size=2, collate_fn=collate_signal),
        max_duration='1ep',
        algorithms=[Distillation(TeacherSignal(), KLDivergence(temperature=2.0))],
        callbacks=[record],
        device='cpu',
        seed=0,
        progress_bar=False,
    )
    trainer.fit()
    gathered = dist.all_gather_object({'first_tokens': record.first_tokens, 'kd': record.kd})
    if dist.get_global_rank() == 0:
        torch.save({'world_size': dist.get_world_size(), 'ranks': gathered}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
