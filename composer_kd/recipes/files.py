"""The user's own data in recipes: images in class folders, and labelled texts in CSV, JSON Lines or ``datasets``
folders, read from disk only.

Each kind has a check that names every problem by its recipe key before anything is built (missing paths,
unknown columns, unknown transforms), and a builder that makes a :class:`~composer_kd.recipes.datasets.DataBundle`
of it, refusing label sets that differ between splits and transforms that disagree on the image shape.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from composer_kd.recipes.data import TextClassificationDataset
from composer_kd.recipes.loader import Problems, RecipeError, nearest
from composer_kd.recipes.schema import ComponentSpec, ImageFolderSpec, TextFilesSpec

__all__ = [
    'IMAGE_EXTENSIONS',
    'TEXT_FORMATS',
    'check_image_folder',
    'check_text_files',
    'default_eval_split',
    'image_classes',
    'image_folder_splits',
    'image_transform',
    'label_names',
    'read_labelled_texts',
    'split_folders',
    'text_columns',
    'text_splits',
    'tokenize_split',
    'write_digits_images',
]

#: The image files an image folder may hold (those torchvision's ``ImageFolder`` reads).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
#: The text file formats, by extension.
TEXT_FORMATS = {'.csv': 'csv', '.tsv': 'tsv', '.jsonl': 'jsonl', '.json': 'json'}


def default_eval_split(splits: Sequence[str], train_split: str) -> list[str]:
    """The split evaluated when a recipe names none: ``val`` if there is one, else the first other split.

    Example:
        .. testcode::

            from composer_kd.recipes.files import default_eval_split

            assert default_eval_split(['test', 'train', 'val'], 'train') == ['val']
            assert default_eval_split(['test', 'train'], 'train') == ['test']
    """
    others = [s for s in splits if s != train_split]
    return ['val'] if 'val' in others else others[:1]


# --- images ---------------------------------------------------------------------------------------------------


def split_folders(folder: str) -> list[str]:
    """The sub-folders of ``folder``, sorted: the splits of an image folder tree.

    Example:
        .. testcode::

            import os, tempfile
            from composer_kd.recipes.files import split_folders

            root = tempfile.mkdtemp()
            for split in ('val', 'train'):
                os.makedirs(os.path.join(root, split))
            assert split_folders(root) == ['train', 'val']
    """
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith('.'))


def image_classes(split: str) -> dict[str, int]:
    """The classes of one split folder: ``{class folder name: number of images}``, sorted by name.

    Args:
        split (str): A split's folder, holding one folder per class.

    Returns:
        dict[str, int]: Each class and how many image files it holds.
    """
    found = {}
    for name in split_folders(split):
        files = [f for f in os.listdir(os.path.join(split, name)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        found[name] = len(files)
    return found


def _transform_names() -> list[str]:
    from torchvision.transforms import v2

    return sorted(n for n in dir(v2) if n[:1].isupper() and isinstance(getattr(v2, n), type))


def check_image_folder(spec: ImageFolderSpec, eval_splits: Optional[Sequence[str]], key: str, problems: Problems):
    """Note every problem of an ``image_folder`` section: its folders, classes, channels, size and transforms.

    Args:
        spec (ImageFolderSpec): The section.
        eval_splits (Sequence[str], optional): The recipe's ``data.eval_splits``.
        key (str): The section's key, ``'data.image_folder'``.
        problems (Problems): Where the problems go.
    """
    if spec.channels not in (1, 3):
        problems.add(f'{key}.channels', f'expected 1 (grayscale) or 3 (RGB), got {spec.channels}')
    if spec.image_size is not None and spec.image_size < 1:
        problems.add(f'{key}.image_size', f'expected a side in pixels >= 1, got {spec.image_size}')
    known = _transform_names()
    for name in ('train_transforms', 'eval_transforms'):
        for i, transform in enumerate(getattr(spec, name)):
            if transform.name not in known:
                problems.add(
                    f'{key}.{name}.{i}.name',
                    f'unknown transform {transform.name!r}{nearest(transform.name, known)} (expected a class of '
                    'torchvision.transforms.v2, e.g. RandomHorizontalFlip, RandomCrop, Normalize)',
                )
    if not spec.folder:
        problems.add(f'{key}.folder', 'required: the folder holding one sub-folder per split (train/, val/, ...)')
        return
    folder = os.path.abspath(os.path.expanduser(spec.folder))
    if not os.path.isdir(folder):
        problems.add(f'{key}.folder', f'no folder at {folder}')
        return
    splits = split_folders(folder)
    wanted = [spec.train_split, *(eval_splits or default_eval_split(splits, spec.train_split))]
    for split in dict.fromkeys(wanted):
        if split not in splits:
            where = f'{key}.train_split' if split == spec.train_split else 'data.eval_splits'
            problems.add(
                where,
                f'no split folder {os.path.join(folder, split)} (the splits there: {", ".join(splits) or "none"})',
            )
    if len(wanted) < 2:
        problems.add(
            f'{key}.folder',
            f'{folder} holds no split to evaluate on besides {spec.train_split}/: add a val/ folder of the classes',
        )
    present = [s for s in dict.fromkeys(wanted) if s in splits]
    classes = {split: image_classes(os.path.join(folder, split)) for split in present}
    for split, counts in classes.items():
        if not counts:
            problems.add(f'{key}.folder', f'{os.path.join(folder, split)} holds no class folder')
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            problems.add(
                f'{key}.folder',
                f'{os.path.join(folder, split)}: no image ({", ".join(IMAGE_EXTENSIONS)}) in the class folders '
                f'{", ".join(empty)}',
            )
    if spec.train_split in classes:
        reference = set(classes[spec.train_split])
        for split, counts in classes.items():
            extra, missing = sorted(set(counts) - reference), sorted(reference - set(counts))
            if split != spec.train_split and (extra or missing):
                problems.add(
                    f'{key}.folder',
                    f'the classes of {split}/ differ from those of {spec.train_split}/: '
                    + '; '.join(
                        text
                        for text in (
                            f'{", ".join(extra)} only in {split}/' if extra else '',
                            f'{", ".join(missing)} missing from {split}/' if missing else '',
                        )
                        if text
                    )
                    + ' (every split needs the same class folders, which give the labels)',
                )


def _build_transform(spec: ComponentSpec, key: str) -> Callable:
    from torchvision.transforms import v2

    kwargs = dict(spec.kwargs)
    try:
        return getattr(v2, spec.name)(**kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError('recipe', [f'{key}: {spec.name} refused {kwargs}: {e}']) from e


def image_transform(spec: ImageFolderSpec, train: bool, key: str = 'data.image_folder') -> Callable:
    """The function that turns one image file read by PIL into the tensor a model takes.

    The image becomes ``channels`` channels (grayscale or RGB), a float tensor in ``[0, 1]``, is resized to
    ``image_size`` x ``image_size`` when set, then goes through ``train_transforms`` (for training) or
    ``eval_transforms``, classes of ``torchvision.transforms.v2``.

    Args:
        spec (ImageFolderSpec): The recipe's ``data.image_folder``.
        train (bool): The training transform, or the evaluation one.
        key (str, optional): The section's key, for messages.

    Returns:
        Callable: A ``torchvision.transforms.v2.Compose``.

    Raises:
        RecipeError: If a transform refuses its arguments.

    Example:
        .. testcode::

            from PIL import Image
            from composer_kd.recipes.files import image_transform
            from composer_kd.recipes.schema import ImageFolderSpec

            spec = ImageFolderSpec(channels=1, image_size=16)
            assert image_transform(spec, train=False)(Image.new('RGB', (8, 8))).shape == (1, 16, 16)
    """
    from torchvision.transforms import v2

    steps: list[Any] = [v2.Grayscale(1) if spec.channels == 1 else v2.RGB(), v2.ToImage()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if spec.image_size is not None:
        steps.append(v2.Resize((spec.image_size, spec.image_size), antialias=True))
    name = 'train_transforms' if train else 'eval_transforms'
    steps += [_build_transform(t, f'{key}.{name}.{i}') for i, t in enumerate(getattr(spec, name))]
    return v2.Compose(steps)


class _Plain(Dataset):
    """An ``ImageFolder`` giving ``(tensor, label)`` with the class tensor as ``torch.long``."""

    def __init__(self, folder: Any):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        image, label = self.folder[index]
        return image, torch.tensor(label, dtype=torch.long)


def image_folder_splits(spec: ImageFolderSpec, splits: Sequence[str]) -> tuple[Dataset, dict[str, Dataset], list]:
    """The training split and the evaluation ``splits`` of an image folder tree, and the class names.

    Args:
        spec (ImageFolderSpec): A section that passed :func:`check_image_folder`.
        splits (Sequence[str]): The evaluation splits to read.

    Returns:
        tuple: ``(train, {split: dataset}, classes)``; examples are ``(image tensor, class index)``.
    """
    from torchvision.datasets import ImageFolder

    folder = os.path.abspath(os.path.expanduser(str(spec.folder)))
    train = ImageFolder(os.path.join(folder, spec.train_split), transform=image_transform(spec, train=True))
    evaluation = {
        split: _Plain(ImageFolder(os.path.join(folder, split), transform=image_transform(spec, train=False)))
        for split in splits
    }
    return _Plain(train), evaluation, list(train.classes)


def write_digits_images(folder: str, splits: Sequence[str] = ('train', 'val', 'test')) -> dict[str, int]:
    """Write scikit-learn's digits as PNG files into an image folder tree: ``folder/<split>/<digit>/<n>.png``.

    The splits are those of :func:`~composer_kd.recipes.data.load_digits_splits` (its default fractions and
    seed); each image is the 8x8 gray digit, scaled to 0-255.

    Args:
        folder (str): Where the tree goes; created if needed.
        splits (Sequence[str], optional): The splits to write. Default: ``train``, ``val`` and ``test``.

    Returns:
        dict[str, int]: How many images each split got.

    Example:
        .. testcode::

            import tempfile
            from composer_kd.recipes.files import write_digits_images

            counts = write_digits_images(tempfile.mkdtemp(), splits=['val'])
            assert counts == {'val': 360}
    """
    from PIL import Image

    from composer_kd.recipes.data import load_digits_splits

    data = load_digits_splits()
    counts = {}
    for split in splits:
        images, labels = getattr(data, split).tensors
        for n, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            target = os.path.join(folder, split, str(label))
            os.makedirs(target, exist_ok=True)
            pixels = (image[0].numpy() * 255).round().astype('uint8')
            Image.fromarray(pixels).save(os.path.join(target, f'{n:04d}.png'))
        counts[split] = len(labels)
    return counts


# --- text -----------------------------------------------------------------------------------------------------


def _text_format(path: str) -> Optional[str]:
    return TEXT_FORMATS.get(os.path.splitext(path)[1].lower())


def _read_rows(path: str, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """The rows of a CSV, TSV, JSON Lines or JSON (a list of objects) file, as dicts."""
    kind = _text_format(path)
    with open(path, newline='', encoding='utf-8') as f:
        if kind in ('csv', 'tsv'):
            reader = csv.DictReader(f, delimiter='\t' if kind == 'tsv' else ',')
            rows = []
            for row in reader:
                if limit is not None and len(rows) >= limit:
                    break
                rows.append(row)
            return rows
        if kind == 'jsonl':
            rows = []
            for number, line in enumerate(f, start=1):
                if limit is not None and len(rows) >= limit:
                    break
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f'{path}, line {number}: not JSON ({e})') from e
            return rows
        rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f'{path}: expected a JSON list of objects, got a {type(rows).__name__}')
        return rows[:limit] if limit is not None else rows


def text_columns(spec: TextFilesSpec, split: str) -> list[str]:
    """The columns one split of a ``text`` section holds (from a file's header or first row, or the dataset's).

    Args:
        spec (TextFilesSpec): The recipe's ``data.text``.
        split (str): A split it names.

    Returns:
        list[str]: The column names.
    """
    if spec.folder:
        return list(_disk_splits(spec)[split].column_names)
    path = os.path.abspath(os.path.expanduser(spec.files[split]))
    if _text_format(path) in ('csv', 'tsv'):
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.reader(f, delimiter='\t' if _text_format(path) == 'tsv' else ',')
            return next(reader, [])
    rows = _read_rows(path, limit=1)
    return list(rows[0]) if rows and isinstance(rows[0], dict) else []


def _disk_splits(spec: TextFilesSpec) -> dict[str, Any]:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(os.path.abspath(os.path.expanduser(str(spec.folder))))
    if isinstance(loaded, DatasetDict):
        return dict(loaded)
    return {spec.train_split: loaded}


def text_splits(spec: TextFilesSpec) -> list[str]:
    """The splits of a ``text`` section: the keys of ``files``, or of the ``datasets`` folder's ``DatasetDict``."""
    return list(_disk_splits(spec)) if spec.folder else list(spec.files)


def check_text_files(
    spec: TextFilesSpec, eval_splits: Optional[Sequence[str]], key: str, problems: Problems, student_kind: str
) -> None:
    """Note every problem of a ``text`` section: its files or folder, splits, columns and tokenizer.

    Args:
        spec (TextFilesSpec): The section.
        eval_splits (Sequence[str], optional): The recipe's ``data.eval_splits``.
        key (str): The section's key, ``'data.text'``.
        problems (Problems): Where the problems go.
        student_kind (str): The student's model kind (a ``huggingface`` student lends its tokenizer).
    """
    if spec.max_length < 2:
        problems.add(f'{key}.max_length', f'expected an integer >= 2, got {spec.max_length}')
    if not spec.tokenizer and student_kind != 'huggingface':
        problems.add(f'{key}.tokenizer', 'required unless the student is a huggingface model (whose is used)')
    if bool(spec.folder) == bool(spec.files):
        problems.add(
            key,
            'expected either files ({split: a .csv, .tsv, .jsonl or .json file}) or folder (written by '
            "datasets' save_to_disk), and not both",
        )
        return
    if spec.folder:
        folder = os.path.abspath(os.path.expanduser(spec.folder))
        if not os.path.isdir(folder):
            problems.add(f'{key}.folder', f'no folder at {folder}')
            return
        try:
            splits = text_splits(spec)
        except Exception as e:  # datasets raises several kinds for a folder it cannot read
            problems.add(f'{key}.folder', f"{folder} is not a folder written by datasets' save_to_disk: {e}")
            return
    else:
        splits = list(spec.files)
        for split, path in spec.files.items():
            full = os.path.abspath(os.path.expanduser(path))
            if _text_format(full) is None:
                problems.add(
                    f'{key}.files.{split}',
                    f'{full}: unknown format (expected a file ending in {", ".join(TEXT_FORMATS)})',
                )
            elif not os.path.isfile(full):
                problems.add(f'{key}.files.{split}', f'no file at {full}')
        if any(p.startswith(f'{key}.files.') for p in problems):
            return
    wanted = [spec.train_split, *(eval_splits or default_eval_split(splits, spec.train_split))]
    for split in dict.fromkeys(wanted):
        if split not in splits:
            where = f'{key}.train_split' if split == spec.train_split else 'data.eval_splits'
            problems.add(where, f'no split {split!r} (the splits: {", ".join(splits) or "none"})')
    if len(wanted) < 2:
        problems.add(key, f'no split to evaluate on besides {spec.train_split!r}: add one (e.g. files.val)')
    for split in dict.fromkeys(s for s in wanted if s in splits):
        try:
            columns = text_columns(spec, split)
        except (ValueError, UnicodeDecodeError) as e:
            problems.add(f'{key}.files.{split}' if spec.files else f'{key}.folder', str(e))
            continue
        for name in ('text_column', 'text_pair_column', 'label_column'):
            column = getattr(spec, name)
            if column is not None and column not in columns:
                problems.add(
                    f'{key}.{name}',
                    f'split {split!r} has no column {column!r}{nearest(column, columns)} (its columns: '
                    f'{", ".join(columns) or "none"})',
                )


def read_labelled_texts(spec: TextFilesSpec, split: str) -> tuple[list[str], Optional[list[str]], list[Any]]:
    """One split's texts (and second texts of pairs) and raw labels, as the files hold them.

    Args:
        spec (TextFilesSpec): A section that passed :func:`check_text_files`.
        split (str): The split.

    Returns:
        tuple: ``(texts, pair texts or None, labels)``.
    """
    if spec.folder:
        data = _disk_splits(spec)[split]
        columns = {
            name: list(data[name]) for name in {spec.text_column, spec.text_pair_column, spec.label_column} if name
        }
        feature = data.features[spec.label_column]
        if hasattr(feature, 'names'):  # a ClassLabel: its names, in its order
            columns[spec.label_column] = [feature.names[i] for i in columns[spec.label_column]]
    else:
        rows = _read_rows(os.path.abspath(os.path.expanduser(spec.files[split])))
        columns = {
            name: [row.get(name) for row in rows]
            for name in {spec.text_column, spec.text_pair_column, spec.label_column}
            if name
        }
    texts = ['' if t is None else str(t) for t in columns[spec.text_column]]
    pairs = ['' if t is None else str(t) for t in columns[spec.text_pair_column]] if spec.text_pair_column else None
    return texts, pairs, columns[spec.label_column]


def label_names(spec: TextFilesSpec, train_labels: Sequence[Any]) -> list[str]:
    """The classes, in index order: integer labels are their own index, other labels are sorted by name."""
    if spec.folder:
        feature = _disk_splits(spec)[spec.train_split].features[spec.label_column]
        if hasattr(feature, 'names'):
            return list(feature.names)
    values = {str(label).strip() for label in train_labels}
    if values and all(v.lstrip('-').isdigit() for v in values):
        numbers = sorted(int(v) for v in values)
        if numbers[0] < 0:
            raise RecipeError('recipe', [f'data.text.label_column: negative label {numbers[0]} in the training split'])
        return [str(i) for i in range(numbers[-1] + 1)]
    return sorted(values)


def tokenize_split(
    spec: TextFilesSpec, split: str, tokenizer: Any, classes: Sequence[str]
) -> TextClassificationDataset:
    """One split tokenized (padded and cut at ``max_length``) with labels as class indices.

    Raises:
        RecipeError: If the split holds a label the training split does not.
    """
    texts, pairs, labels = read_labelled_texts(spec, split)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(label).strip() for label in labels} - set(index))
    if unknown:
        shown = ', '.join(repr(u) for u in unknown[:5]) + (' ...' if len(unknown) > 5 else '')
        raise RecipeError(
            'recipe',
            [
                f'data.text.label_column: split {split!r} holds labels the training split does not: {shown} (the '
                f'training labels: {", ".join(classes)}); every split needs the same label set'
            ],
        )
    arguments = (texts, pairs) if pairs is not None else (texts,)
    encoded = tokenizer(
        *arguments, truncation=True, padding='max_length', max_length=spec.max_length, return_tensors='pt'
    )
    return TextClassificationDataset(
        encoded['input_ids'],
        encoded['attention_mask'],
        torch.tensor([index[str(label).strip()] for label in labels], dtype=torch.long),
        encoded.get('token_type_ids'),
    )
