"""Datasets that need no network: scikit-learn's bundled digits, synthetic text, and GLUE files already on disk.

Every loader here reads only what is on the machine. Nothing is downloaded, ever: a missing file is reported
with the exact path that was looked at.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, TensorDataset

from composer_kd.losses import IGNORE_INDEX, cross_entropy_with_hidden_labels

__all__ = [
    'DIGITS_TASKS',
    'GLUE_TASKS',
    'IGNORE_INDEX',
    'DigitsSplits',
    'GlueTask',
    'MixedBatchSampler',
    'MultiTaskDataset',
    'TextClassificationDataset',
    'cross_entropy_with_hidden_labels',
    'digits_multitask',
    'glue_files',
    'load_digits_splits',
    'read_glue_split',
    'synthetic_text_classification',
]

DIGITS_CLASSES = 10
DIGITS_SHAPE = (1, 8, 8)

#: Labels a digit image carries besides its class, each a fact about the digit: ``{task: number of classes}``.
#: ``digit`` is the class itself, ``parity`` 1 for odd digits, ``at_least_5`` 1 for 5 to 9.
DIGITS_TASKS: dict[str, int] = {'digit': 10, 'parity': 2, 'at_least_5': 2}


@dataclass
class DigitsSplits:
    """scikit-learn's handwritten digits, split three ways.

    Attributes:
        train (TensorDataset): The training split. With a labelled subset, either only that subset or, when the
            other images are kept as a transfer set, every image with the hidden labels set to ``IGNORE_INDEX``.
        val (TensorDataset): The validation split, for choosing hyperparameters.
        test (TensorDataset): The held-out test split, for reporting only.
        full_train_size (int): The size of the training split before any subset was taken.
        n_labelled (int): How many training images keep their label.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    full_train_size: int
    n_labelled: int


def _stratified_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` examples of every class, drawn reproducibly."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if per_class > len(members):
            raise ValueError(f'Asked for {per_class} examples of class {c}, but the split holds only {len(members)}.')
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def load_digits_splits(
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
    split_seed: int = 0,
    per_class: Optional[int] = None,
    keep_unlabelled: bool = False,
    channels: int = 1,
) -> DigitsSplits:
    """Load ``sklearn.datasets.load_digits`` (1,797 8x8 images, shipped inside scikit-learn) as tensors.

    The split is stratified and depends only on ``split_seed``, so runs with different training seeds see the same
    examples. Pixels are scaled to ``[0, 1]`` and shaped ``[N, 1, 8, 8]``.

    Args:
        val_fraction (float, optional): Fraction of all images kept for validation. Default: ``0.2``.
        test_fraction (float, optional): Fraction of all images held out for the test. Default: ``0.3``.
        split_seed (int, optional): Seed of the split and of the labelled subset. Default: ``0``.
        per_class (int, optional): Keep the labels of only this many training images of each class (a small
            labelled set). Default: ``None``, every label.
        keep_unlabelled (bool, optional): With ``per_class``, keep the other training images too, labelled
            ``IGNORE_INDEX``: a transfer set on which only a teacher can say anything. Default: ``False``, drop them.
        channels (int, optional): Repeat the gray channel this many times, e.g. 3 for models built for RGB
            (torchvision's). Default: ``1``.

    Returns:
        DigitsSplits: The train, validation and test splits.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # scikit-learn is the optional `demo` extra
        raise ImportError(
            f'{e}: the digits come with scikit-learn; install it with pip install "composer-kd[demo]".'
        ) from e

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f'val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must lie in (0, 1) and sum below 1.'
        )
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, *DIGITS_SHAPE)
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=val_fraction / (1 - test_fraction), stratify=rest_y, random_state=split_seed
    )
    full_train_size = len(train_y)
    if per_class is not None:
        keep = _stratified_subset(train_y, per_class, split_seed)
        if keep_unlabelled:
            hidden = np.ones(len(train_y), dtype=bool)
            hidden[keep] = False
            train_y = np.where(hidden, IGNORE_INDEX, train_y)
        else:
            train_x, train_y = train_x[keep], train_y[keep]

    def as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        images = torch.from_numpy(np.ascontiguousarray(x))
        return TensorDataset(images.repeat(1, channels, 1, 1), torch.from_numpy(y).long())

    return DigitsSplits(
        train=as_dataset(train_x, train_y),
        val=as_dataset(val_x, val_y),
        test=as_dataset(test_x, test_y),
        full_train_size=full_train_size,
        n_labelled=int((train_y != IGNORE_INDEX).sum()),
    )


class MultiTaskDataset(Dataset):
    """Inputs with one label per task, as flat dict examples ``{'inputs': x, '<task>': label, ...}``.

    Flat dicts of tensors are what Composer's default batch handling splits into microbatches and counts, and
    each model reads the labels of its own tasks by name, whatever other tasks the data carry.

    Args:
        inputs (torch.Tensor): ``[N, ...]`` inputs.
        labels (Mapping[str, torch.Tensor]): ``{task: [N] class indices}``, ``IGNORE_INDEX`` where hidden.

    Example:
        .. testcode::

            import torch
            from composer_kd.recipes.data import MultiTaskDataset

            data = MultiTaskDataset(torch.zeros(4, 2), {'a': torch.arange(4), 'b': torch.ones(4, dtype=torch.long)})
            assert set(data[1]) == {'inputs', 'a', 'b'} and int(data[1]['a']) == 1
    """

    def __init__(self, inputs: torch.Tensor, labels: Mapping[str, torch.Tensor]):
        if not labels:
            raise ValueError('labels: expected at least one task, got none.')
        if 'inputs' in labels:
            raise ValueError("labels: 'inputs' names the inputs and cannot be a task.")
        for task, column in labels.items():
            if len(column) != len(inputs):
                raise ValueError(f'labels[{task!r}] has {len(column)} entries for {len(inputs)} inputs.')
        self.inputs = inputs
        self.labels = dict(labels)

    @property
    def tasks(self) -> list[str]:
        return list(self.labels)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {'inputs': self.inputs[index], **{task: column[index] for task, column in self.labels.items()}}


def digits_multitask(dataset: TensorDataset, tasks: Sequence[str]) -> MultiTaskDataset:
    """Digit images labelled for several tasks of :data:`DIGITS_TASKS`, derived from their class.

    A hidden class (``IGNORE_INDEX``) hides the example's label in every task.

    Args:
        dataset (TensorDataset): ``(images, digit classes)``, e.g. a split of :func:`load_digits_splits`.
        tasks (Sequence[str]): Names from :data:`DIGITS_TASKS`, in the order wanted.

    Returns:
        MultiTaskDataset: The same images, with a label column per task.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import TensorDataset
            from composer_kd.recipes.data import digits_multitask

            data = digits_multitask(TensorDataset(torch.zeros(3, 1, 8, 8), torch.tensor([3, 8, -100])), ['parity'])
            assert data.labels['parity'].tolist() == [1, 0, -100]
    """
    images, digits = dataset.tensors
    derived = {'digit': digits, 'parity': digits % 2, 'at_least_5': (digits >= 5).long()}
    unknown = [t for t in tasks if t not in DIGITS_TASKS]
    if unknown or not tasks:
        raise ValueError(f'tasks: expected names among {", ".join(DIGITS_TASKS)}, got {list(tasks)}.')
    hidden = digits == IGNORE_INDEX
    return MultiTaskDataset(images, {t: torch.where(hidden, digits, derived[t]) for t in tasks})


class MixedBatchSampler(Sampler[list[int]]):
    """Batches with a fixed number of labelled examples, the rest unlabelled.

    With a few labelled examples among many unlabelled ones, plain shuffling would give each batch a varying
    and small number of labelled examples. Fixing it means a model trained only on the labels gets exactly the
    batches it would get from the labelled set alone, and a distilled model additionally sees unlabelled
    examples, so comparing the two is fair. An epoch ends when the unlabelled examples are used up; labelled
    ones are cycled, reshuffled on each pass.

    The order of epoch ``e`` depends only on ``(seed, e)``, like ``DistributedSampler``'s: two trainers given
    fresh samplers with one seed see identical batches, whatever else consumed random numbers in between.

    Args:
        labels (torch.Tensor): Every example's label, ``IGNORE_INDEX`` where hidden.
        labelled_per_batch (int): Labelled examples per batch.
        batch_size (int): Examples per batch.
        seed (int, optional): The shuffling's seed. Default: ``0``.
    """

    def __init__(self, labels: torch.Tensor, labelled_per_batch: int, batch_size: int, seed: int = 0):
        labels = torch.as_tensor(labels)
        self.labelled = torch.nonzero(labels != IGNORE_INDEX).flatten()
        self.unlabelled = torch.nonzero(labels == IGNORE_INDEX).flatten()
        if not 0 < labelled_per_batch < batch_size:
            raise ValueError(f'labelled_per_batch ({labelled_per_batch}) must lie in (0, batch_size={batch_size}).')
        if len(self.labelled) < labelled_per_batch or len(self.unlabelled) < batch_size - labelled_per_batch:
            raise ValueError(
                f'A MixedBatchSampler of {labelled_per_batch} labelled examples per batch of {batch_size} needs at '
                f'least {labelled_per_batch} labelled and {batch_size - labelled_per_batch} unlabelled examples; '
                f'got {len(self.labelled)} and {len(self.unlabelled)}.'
            )
        self.labelled_per_batch = labelled_per_batch
        self.unlabelled_per_batch = batch_size - labelled_per_batch
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.unlabelled) // self.unlabelled_per_batch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch ``epoch``'s batches."""
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        unlabelled = self.unlabelled[torch.randperm(len(self.unlabelled), generator=generator)]
        labelled: list[int] = []
        for i in range(len(self)):
            if len(labelled) < self.labelled_per_batch:
                # A new pass over the labelled examples; the ones left from the last pass go first, and their
                # second appearance goes to the end of the new pass, so no batch holds an example twice.
                order = self.labelled[torch.randperm(len(self.labelled), generator=generator)].tolist()
                pending = set(labelled)
                labelled += [j for j in order if j not in pending] + [j for j in order if j in pending]
            chosen, labelled = labelled[: self.labelled_per_batch], labelled[self.labelled_per_batch :]
            yield chosen + unlabelled[i * self.unlabelled_per_batch : (i + 1) * self.unlabelled_per_batch].tolist()


class TextClassificationDataset(Dataset):
    """Tokenized sentences (or sentence pairs) and their labels, as dict examples a Hugging Face model takes.

    Args:
        input_ids (torch.Tensor): ``[N, seq]`` token ids, padded.
        attention_mask (torch.Tensor): ``[N, seq]``, 1 on real tokens.
        labels (torch.Tensor): ``[N]`` class indices.
        token_type_ids (torch.Tensor, optional): ``[N, seq]`` segment ids of sentence pairs.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ):
        self.columns = {'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels}
        if token_type_ids is not None:
            self.columns['token_type_ids'] = token_type_ids

    def __len__(self) -> int:
        return len(self.columns['labels'])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def synthetic_text_classification(
    n: int,
    vocab_size: int = 200,
    seq_len: int = 24,
    n_classes: int = 3,
    keywords_per_class: int = 8,
    label_noise: float = 0.05,
    seed: int = 0,
) -> TextClassificationDataset:
    """A text classification task made of random token ids, learnable by a small transformer.

    Each class owns ``keywords_per_class`` keyword tokens; a sentence of random length mixes filler tokens with
    keywords of several classes, and its label is the class whose keywords occur most often (so the model must
    count over the whole sentence, not look at one position). A fraction ``label_noise`` of labels is then
    replaced at random, so a model fitting the training labels exactly overfits. Token 0 is padding, 1 is
    ``[CLS]``.

    Args:
        n (int): Number of examples.
        vocab_size (int, optional): Token ids lie in ``[0, vocab_size)``. Default: ``200``.
        seq_len (int, optional): Padded length. Default: ``24``.
        n_classes (int, optional): Number of classes. Default: ``3``.
        keywords_per_class (int, optional): Keyword tokens per class. Default: ``8``.
        label_noise (float, optional): Fraction of labels replaced at random. Default: ``0.05``.
        seed (int, optional): The generator's seed. Default: ``0``.

    Returns:
        TextClassificationDataset: ``input_ids``, ``attention_mask`` and ``labels``.
    """
    first_filler = 2 + n_classes * keywords_per_class
    if vocab_size <= first_filler:
        raise ValueError(f'vocab_size must exceed {first_filler} for {n_classes} classes of {keywords_per_class}.')
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=generator)
    input_ids = torch.randint(first_filler, vocab_size, (n, seq_len), generator=generator)
    # About a third of the positions carry a keyword of a random class.
    is_keyword = torch.rand(n, seq_len, generator=generator) < 0.35
    keyword_class = torch.randint(0, n_classes, (n, seq_len), generator=generator)
    keyword = (
        2 + keyword_class * keywords_per_class + torch.randint(0, keywords_per_class, (n, seq_len), generator=generator)
    )
    input_ids = torch.where(is_keyword, keyword, input_ids)
    input_ids[:, 0] = 1
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    counted = is_keyword & attention_mask.bool()
    counted[:, 0] = False
    counts = torch.stack([(counted & (keyword_class == c)).sum(dim=1) for c in range(n_classes)], dim=1)
    # Ties go to a random one of the tied classes rather than always to the lowest index.
    labels = (counts.float() + 0.1 * torch.rand(n, n_classes, generator=generator)).argmax(dim=1)
    noisy = torch.rand(n, generator=generator) < label_noise
    labels = torch.where(noisy, torch.randint(0, n_classes, (n,), generator=generator), labels)
    return TextClassificationDataset(input_ids, attention_mask, labels)


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's fields are in the original GLUE TSV files.

    Attributes:
        text_fields (tuple[str, ...]): The header names of the sentence (or sentence pair) columns.
        label_field (str): The header name of the label column.
        labels (tuple[str, ...]): The label strings, in class-index order.
        dev_file (str): The file name of the labelled evaluation split.
    """

    text_fields: tuple[str, ...]
    label_field: str
    labels: tuple[str, ...]
    dev_file: str = 'dev.tsv'
    train_file: str = 'train.tsv'
    extra: dict[str, Any] = field(default_factory=dict)


#: The classification tasks of GLUE whose TSV files have a header row, as distributed by the GLUE benchmark.
GLUE_TASKS: dict[str, GlueTask] = {
    'qnli': GlueTask(('question', 'sentence'), 'label', ('entailment', 'not_entailment')),
    'rte': GlueTask(('sentence1', 'sentence2'), 'label', ('entailment', 'not_entailment')),
    'wnli': GlueTask(('sentence1', 'sentence2'), 'label', ('0', '1')),
    'sst2': GlueTask(('sentence',), 'label', ('0', '1')),
    'qqp': GlueTask(('question1', 'question2'), 'is_duplicate', ('0', '1')),
    'mnli': GlueTask(
        ('sentence1', 'sentence2'), 'gold_label', ('entailment', 'neutral', 'contradiction'), 'dev_matched.tsv'
    ),
}


def glue_files(task: str, folder: str) -> dict[str, str]:
    """The absolute paths of a GLUE task's train and dev files under ``folder`` (whether or not they exist)."""
    spec = GLUE_TASKS[task]
    folder = os.path.abspath(os.path.expanduser(folder))
    return {'train': os.path.join(folder, spec.train_file), 'dev': os.path.join(folder, spec.dev_file)}


def read_glue_split(
    path: str,
    task: str,
    tokenize: Callable[..., dict[str, Any]],
    max_length: int = 128,
    limit: Optional[int] = None,
) -> TextClassificationDataset:
    """Read one GLUE TSV file and tokenize it.

    Args:
        path (str): The file, e.g. ``.../QNLI/train.tsv``.
        task (str): A key of :data:`GLUE_TASKS`.
        tokenize (Callable): A Hugging Face tokenizer.
        max_length (int, optional): Sequences are truncated and padded to this length. Default: ``128``.
        limit (int, optional): Read only the first ``limit`` rows. Default: every row.

    Returns:
        TextClassificationDataset: The tokenized examples.
    """
    spec = GLUE_TASKS[task]
    columns: list[list[str]] = [[] for _ in spec.text_fields]
    labels: list[int] = []
    with open(path, newline='', encoding='utf-8') as f:
        # GLUE's files are not quoted: a quote character inside a sentence is text.
        reader = csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
        missing = [name for name in (*spec.text_fields, spec.label_field) if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f'{path}: expected the GLUE {task} columns {missing}, found {reader.fieldnames}.')
        for row in reader:
            if limit is not None and len(labels) >= limit:
                break
            label = row[spec.label_field]
            if label not in spec.labels:
                continue  # an unlabelled or malformed row
            for column, name in zip(columns, spec.text_fields, strict=True):
                column.append(row[name] or '')
            labels.append(spec.labels.index(label))
    encoded = tokenize(*columns, truncation=True, padding='max_length', max_length=max_length, return_tensors='pt')
    return TextClassificationDataset(
        encoded['input_ids'],
        encoded['attention_mask'],
        torch.tensor(labels, dtype=torch.long),
        encoded.get('token_type_ids'),
    )


def describe_sizes(datasets: Sequence[Dataset]) -> str:
    """``'1000 / 250 / 540'``: the sizes of several splits, for summaries."""
    return ' / '.join(str(len(d)) for d in datasets)  # type: ignore[arg-type]
