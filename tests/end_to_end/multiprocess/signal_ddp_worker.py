"""Run by tests/end_to_end/multiprocess/test_signal_multiprocess.py under Composer's launcher: two processes write
one teacher signal between them (rank zero also writes it alone, for comparison), resume it after a part's index
was cut short, write it again with the teacher sharded across them (and resume that), then distil from it, each
recording the sequences it was given, and resume that fit mid-epoch."""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
from composer import Callback, Trainer
from composer.devices import DeviceCPU
from composer.models import HuggingFaceModel
from composer.utils import dist
from tiny_models import tiny_gpt2
from torch.utils.data import DataLoader
from transformers import GPT2LMHeadModel
from worker_exit import leave_process_group

from composer_kd import Distillation, KLDivergence, TeacherSignal
from composer_kd.models.sharding import shard_teacher
from composer_kd.signal.shards import SignalDataset, collate_signal
from composer_kd.signal.writer import write_teacher_signal

warnings.filterwarnings('ignore', message='The top 4 logits keep')  # a random teacher keeps little in its top 4


def gpt2(seed: int) -> GPT2LMHeadModel:
    # No dropout: a fit resumed mid-epoch then computes what the uninterrupted one did.
    return tiny_gpt2(1, 16, seed, vocab=64, positions=16)


class Record(Callback):
    def __init__(self):
        self.first_tokens: list[list[int]] = []
        self.kd: list[float] = []

    def after_loss(self, state, logger):
        self.first_tokens.append(state.batch['input_ids'][:, 0].tolist())
        self.kd.append(float(state.loss['kd']))


def fit(shards: str, **kwargs) -> Record:
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
        **{key: value for key, value in kwargs.items() if key != 'duration'},
    )
    trainer.fit(duration=kwargs.get('duration'))
    trainer.close()
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--output', required=True)
    args = parser.parse_args()
    shards, alone = os.path.join(args.output, 'signal'), os.path.join(args.output, 'alone')
    dist.initialize_dist(DeviceCPU())
    rank = dist.get_global_rank()
    # Sequence i starts with token i, so the first tokens say which sequences a process read.
    tokens = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = torch.arange(16)
    options = dict(k=4, batch_size=2, sequences_per_part=5, progress=False)  # parts 0 and 2 rank 0's, 1 and 3 rank 1's

    start = time.perf_counter()
    first = write_teacher_signal(gpt2(0), tokens, shards, **options)
    seconds = {'two_ranks': time.perf_counter() - start}
    if rank == 0:
        start = time.perf_counter()
        write_teacher_signal(gpt2(0), tokens, alone, distributed=False, **options)
        seconds['one_rank'] = time.perf_counter() - start
    dist.barrier()

    # Rank 1's last part as a kill while Streaming wrote its index leaves it: empty. The rerun writes it again.
    if rank == 1:
        open(os.path.join(shards, 'part-00003', 'index.json'), 'w').close()
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        resumed = write_teacher_signal(gpt2(0), tokens, shards, **options)
    reported = [str(w.message) for w in caught if 'unreadable or incomplete' in str(w.message)]

    # The same signal from a teacher sharded across the two ranks: rank 0's parts take 6 forward passes, rank 1's 4,
    # and on resume (part 3 cut again) rank 1 makes one, rank 0 none: each pads to the other's count.
    sharded_shards = os.path.join(args.output, 'sharded')
    sharded_teacher = shard_teacher(gpt2(0).eval(), torch.device('cpu'))
    sharded = write_teacher_signal(sharded_teacher, tokens, sharded_shards, **options)
    if rank == 1:
        open(os.path.join(sharded_shards, 'part-00003', 'index.json'), 'w').close()
    dist.barrier()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        sharded_resumed = write_teacher_signal(sharded_teacher, tokens, sharded_shards, **options)

    record = fit(shards)
    # Mid-epoch resume: two batches, a checkpoint, then the rest of the epoch from it.
    checkpoints = os.path.join(args.output, 'checkpoints')
    before = fit(shards, save_folder=checkpoints, save_interval='2ba', duration='2ba')
    dist.barrier()
    after = fit(shards, load_path=os.path.join(checkpoints, 'ep0-ba2-rank{rank}.pt'))
    gathered = dist.all_gather_object(
        {
            'first_tokens': record.first_tokens,
            'kd': record.kd,
            'resumed_first_tokens': before.first_tokens + after.first_tokens,
            'resumed_kd': before.kd + after.kd,
            'first': first,
            'resumed': resumed,
            'reported': reported,
            'sharded': sharded,
            'sharded_resumed': sharded_resumed,
            'seconds': seconds,
        }
    )
    if rank == 0:
        torch.save({'world_size': dist.get_world_size(), 'ranks': gathered}, os.path.join(args.output, 'results.pt'))


if __name__ == '__main__':
    main()
    leave_process_group()
