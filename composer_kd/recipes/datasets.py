"""The dataset a recipe names, as data loaders that give every trainer of a run the same batches."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

from composer_kd.recipes.data import (
    DIGITS_CLASSES,
    DIGITS_SHAPE,
    DIGITS_TASKS,
    GLUE_TASKS,
    IGNORE_INDEX,
    MixedBatchSampler,
    MultiTaskDataset,
    digits_multitask,
    glue_files,
    load_digits_splits,
    read_glue_split,
    synthetic_text_classification,
)
from composer_kd.recipes.files import (
    default_eval_split,
    image_folder_splits,
    label_names,
    read_labelled_texts,
    split_folders,
    text_splits,
    tokenize_split,
)
from composer_kd.recipes.loader import RecipeError
from composer_kd.recipes.models import TaskInfo, find_pretrained
from composer_kd.recipes.schema import DataSpec

__all__ = ['DATASETS', 'FILE_DATASETS', 'DataBundle', 'build_data', 'example_batch']

#: The datasets a recipe may name: ``{name: (what it is, its splits, the splits evaluated by default)}``.
DATASETS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    'digits': ("scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)", ('val', 'test'), ('val',)),
    'synthetic_text': ('generated token sequences, keyword-count classification', ('val',), ('val',)),
    'glue': ('a GLUE task from its TSV files on disk (qnli, rte, sst2, qqp, mnli, wnli)', ('dev',), ('dev',)),
    # Datasets of the user's files: their splits are what the disk holds.
    'image_folder': ('images in class folders on disk (train/<class>/*.png, val/...)', (), ()),
    'text': ("labelled texts on disk: CSV, TSV, JSON Lines files or a datasets' save_to_disk folder", (), ()),
    'mds': ('token sequences for causal language models in MosaicML Streaming shards, local or remote', (), ()),
}
#: The datasets whose splits are read from the disk rather than fixed.
FILE_DATASETS = ('image_folder', 'text', 'mds')


@dataclass
class DataBundle:
    """A recipe's data: the task, and factories of fresh loaders.

    Fresh loaders, each with a sampler seeded by the recipe's seed, give every trainer of a run (teacher,
    distilled student, student alone) the same batches in the same order, whatever ran before it.

    Attributes:
        task (TaskInfo): Classes and input shape, for building models.
        train (Dataset): The training examples.
        splits (dict[str, Dataset]): The evaluation splits by name.
        batch_size (int): Training batch size.
        eval_batch_size (int): Evaluation batch size.
        seed (int): Seeds the training order.
        labelled_per_batch (int, optional): When set, each training batch holds this many labelled examples and
            the rest unlabelled (see :class:`~composer_kd.recipes.data.MixedBatchSampler`).
        default_eval_splits (tuple[str, ...]): Evaluated when the recipe does not say.
        notes (dict[str, int]): Counts worth reporting (labelled examples, classes).
        tokenizer (str, optional): For text tokenized here: the tokenizer's directory.
    """

    task: TaskInfo
    train: Dataset
    splits: dict[str, Dataset]
    batch_size: int
    eval_batch_size: int
    seed: int
    labelled_per_batch: Optional[int] = None
    default_eval_splits: tuple[str, ...] = ('val',)
    notes: dict[str, int] = field(default_factory=dict)
    tokenizer: Optional[str] = None

    def train_loader(self, drop_last: bool = False) -> DataLoader:
        """A fresh training loader: shuffled, reproducibly from the seed alone.

        Args:
            drop_last (bool, optional): Drop each epoch's last batch when it is incomplete. Default: ``False``.
                Batches of mixed labelled and unlabelled examples are always complete.

        Returns:
            DataLoader: The loader.
        """
        if self.labelled_per_batch is not None:
            # Hidden labels are hidden in every task of multi-task data: any task's column tells them.
            if isinstance(self.train, MultiTaskDataset):
                labels = next(iter(self.train.labels.values()))
            else:
                labels = self.train.tensors[1]  # type: ignore[attr-defined]
            sampler = MixedBatchSampler(labels, self.labelled_per_batch, self.batch_size, seed=self.seed)
            return DataLoader(self.train, batch_sampler=sampler)
        # Composer's own sampler: its order is a function of (seed, epoch), and the trainer sets the epoch.
        sampler = dist.get_sampler(self.train, shuffle=True, seed=self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last)

    def eval_loader(self, split: str) -> DataLoader:
        """A loader over the evaluation split ``split``, in order."""
        return DataLoader(self.splits[split], batch_size=self.eval_batch_size, shuffle=False)


def _digits(spec: DataSpec, seed: int) -> DataBundle:
    options = spec.digits
    splits = load_digits_splits(
        val_fraction=options.val_fraction,
        test_fraction=options.test_fraction,
        split_seed=options.split_seed,
        per_class=options.per_class,
        keep_unlabelled=options.keep_unlabelled,
        channels=options.channels,
    )
    hidden = int((splits.train.tensors[1] == IGNORE_INDEX).sum())
    mixed = options.labelled_per_batch if hidden else None
    tasks = list(options.tasks)
    train, val, test = splits.train, splits.val, splits.test
    if tasks:
        train, val, test = (digits_multitask(split, tasks) for split in (train, val, test))
    return DataBundle(
        task=TaskInfo(
            'image',
            DIGITS_CLASSES,
            (options.channels, *DIGITS_SHAPE[1:]),
            tasks={t: DIGITS_TASKS[t] for t in tasks},
        ),
        train=train,
        splits={'val': val, 'test': test},
        batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size,
        seed=seed,
        labelled_per_batch=mixed,
        notes={'labelled': splits.n_labelled, 'unlabelled': hidden},
    )


def _synthetic_text(spec: DataSpec, seed: int) -> DataBundle:
    o = spec.synthetic_text
    common = dict(
        vocab_size=o.vocab_size,
        seq_len=o.seq_len,
        n_classes=o.n_classes,
        keywords_per_class=o.keywords_per_class,
    )
    # Different seeds for the two splits; validation labels are clean, so accuracy measures the rule itself.
    train = synthetic_text_classification(o.n_train, label_noise=o.label_noise, seed=o.seed, **common)
    val = synthetic_text_classification(o.n_val, label_noise=0.0, seed=o.seed + 1, **common)
    return DataBundle(
        task=TaskInfo('text', o.n_classes, (o.seq_len,), vocab_size=o.vocab_size),
        train=train,
        splits={'val': val},
        batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size,
        seed=seed,
    )


def _glue(spec: DataSpec, seed: int, tokenizer_name: Optional[str]) -> DataBundle:
    from transformers import AutoTokenizer

    o = spec.glue
    assert o.folder is not None and tokenizer_name is not None  # checked by validate.check_recipe
    directory, _ = find_pretrained(tokenizer_name)
    if directory is None:
        raise FileNotFoundError(f'tokenizer {tokenizer_name!r} is not on this machine.')
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    files = glue_files(o.task, o.folder)
    train = read_glue_split(files['train'], o.task, tokenizer, o.max_length, o.max_train_examples)
    dev = read_glue_split(files['dev'], o.task, tokenizer, o.max_length, o.max_eval_examples)
    return DataBundle(
        task=TaskInfo('text', len(GLUE_TASKS[o.task].labels), (o.max_length,)),
        train=train,
        splits={'dev': dev},
        batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size,
        seed=seed,
        default_eval_splits=('dev',),
        tokenizer=directory,
    )


def _image_folder(spec: DataSpec, seed: int) -> DataBundle:
    o = spec.image_folder
    folder = os.path.abspath(os.path.expanduser(str(o.folder)))
    splits = list(spec.eval_splits or default_eval_split(split_folders(folder), o.train_split))
    train, evaluation, classes = image_folder_splits(o, splits)
    first = train[0][0]
    shape = tuple(first.shape)
    for split, dataset in evaluation.items():
        other = tuple(dataset[0][0].shape)
        if other != shape:
            raise RecipeError(
                'recipe',
                [
                    f'data.image_folder: the training transforms give images of shape {list(shape)} but those of '
                    f'{split}/ come out {list(other)}; set data.image_folder.image_size, or make train_transforms '
                    'and eval_transforms end at one size (e.g. RandomCrop and CenterCrop of one size)'
                ],
            )
    return DataBundle(
        task=TaskInfo('image', len(classes), shape),
        train=train,
        splits=evaluation,
        batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size,
        seed=seed,
        default_eval_splits=tuple(splits),
        notes={'classes': len(classes)},
    )


def _text_files(spec: DataSpec, seed: int, tokenizer_name: Optional[str]) -> DataBundle:
    from transformers import AutoTokenizer

    o = spec.text
    assert tokenizer_name is not None  # checked by validate.check_recipe
    directory, _ = find_pretrained(tokenizer_name)
    if directory is None:
        raise FileNotFoundError(f'tokenizer {tokenizer_name!r} is not on this machine.')
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    splits = list(spec.eval_splits or default_eval_split(text_splits(o), o.train_split))
    _, _, train_labels = read_labelled_texts(o, o.train_split)
    classes = label_names(o, train_labels)
    train = tokenize_split(o, o.train_split, tokenizer, classes)
    return DataBundle(
        task=TaskInfo('text', len(classes), (o.max_length,), vocab_size=len(tokenizer)),
        train=train,
        splits={split: tokenize_split(o, split, tokenizer, classes) for split in splits},
        batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size,
        seed=seed,
        default_eval_splits=tuple(splits),
        notes={'classes': len(classes)},
        tokenizer=directory,
    )


def _mds(spec: DataSpec, seed: int) -> DataBundle:
    from composer_kd.recipes.mds_data import MdsTokenSequences, mds_columns, resolve_token_column

    o = spec.mds
    splits = list(spec.eval_splits) if spec.eval_splits is not None else ['val']
    datasets = {}
    for split in [o.train_split, *splits]:
        try:
            column = resolve_token_column(mds_columns(o, split), o.column)
        except FileNotFoundError as e:
            raise RecipeError('recipe', [f'data.mds.path: split {split!r} has no MDS index: {e} is missing']) from e
        if column is None:  # checked by the validation; a remote index may have changed since
            raise RecipeError('recipe', [f'data.mds.column: split {split!r} has no column of token ids'])
        datasets[split] = MdsTokenSequences(o, split, column)
    return DataBundle(
        task=TaskInfo('lm', o.vocab_size or 0, (o.max_seq_len,), vocab_size=o.vocab_size),
        train=datasets.pop(o.train_split),
        splits=datasets,
        batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size,
        seed=seed,
        default_eval_splits=tuple(splits),
        notes={'sequences': len(datasets[splits[0]]) if splits else 0},
    )


_BUILDERS: dict[str, Callable[..., DataBundle]] = {
    'digits': _digits,
    'synthetic_text': _synthetic_text,
    'image_folder': _image_folder,
    'mds': _mds,
}


def build_data(spec: DataSpec, seed: int, tokenizer_name: Optional[str] = None) -> DataBundle:
    """Load the dataset ``spec`` names (from disk or memory only).

    Args:
        spec (DataSpec): The recipe's ``data`` section.
        seed (int): The recipe's seed, which orders the training batches.
        tokenizer_name (str, optional): For text read from files: the tokenizer's directory or cached Hub id.

    Returns:
        DataBundle: The task and its loaders.
    """
    if spec.name == 'glue':
        bundle = _glue(spec, seed, spec.glue.tokenizer or tokenizer_name)
    elif spec.name == 'text':
        bundle = _text_files(spec, seed, spec.text.tokenizer or tokenizer_name)
    else:
        bundle = _BUILDERS[spec.name](spec, seed)
    if spec.name not in FILE_DATASETS:
        bundle.default_eval_splits = DATASETS[spec.name][2]
    return bundle


def example_batch(data: DataBundle, size: int = 2):
    """The first ``size`` training examples as one batch, as the training loader collates them.

    Args:
        data (DataBundle): A recipe's data.
        size (int, optional): How many examples. Default: ``2``.

    Returns:
        Any: The batch.
    """
    loader = DataLoader(data.train, batch_size=size, shuffle=False)
    return next(iter(loader))
