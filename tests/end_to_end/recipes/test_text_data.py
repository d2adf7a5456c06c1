"""The BBC News loader reads the packaged corpus faithfully, drops repeated stories, and splits without overlap."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from composer_kd.recipes.text_data import (
    LabelledTexts,
    article_text,
    bbc_news_dir,
    decode_article,
    drop_duplicates,
    read_bbc_news,
    split_texts,
    tokenize_texts,
    trim_padding,
)

TOPICS = ('business', 'entertainment', 'politics', 'sports', 'tech')


def _files_by_topic() -> dict[str, list[Path]]:
    """The corpus's article files, listed with os.walk rather than the loader's own traversal."""
    root = Path(str(bbc_news_dir()))
    found: dict[str, list[Path]] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith('.txt'):
                found.setdefault(Path(folder).name, []).append(Path(folder) / name)
    return found


def test_the_package_ships_the_bbc_corpus():
    files = _files_by_topic()
    assert tuple(sorted(files)) == TOPICS
    # The published corpus: 2,225 articles, 510 business, 386 entertainment, 417 politics, 511 sport, 401 tech.
    assert {topic: len(paths) for topic, paths in files.items()} == {
        'business': 510,
        'entertainment': 386,
        'politics': 417,
        'sports': 511,
        'tech': 401,
    }


def test_headlines_are_first_lines_without_repeats():
    files = _files_by_topic()
    news = read_bbc_news()
    assert news.label_names == TOPICS
    first_lines: dict[str, str] = {}
    for topic, paths in files.items():
        for path in paths:
            first_line = path.read_bytes().split(b'\n', 1)[0]
            first_lines[' '.join(first_line.decode('utf-8', errors='replace').split())] = topic
    # Every distinct headline once, under its folder's topic (the corpus never files one story under two topics).
    assert len(news) == len(first_lines) == 2096
    assert len(set(news.texts)) == len(news)
    assert all(
        news.label_names[label] == first_lines[text] for text, label in zip(news.texts, news.labels, strict=True)
    )
    assert news.texts[0] == 'Ad sales boost Time Warner profit'  # business/001.txt


def test_lead_keeps_the_first_paragraph_and_the_same_stories():
    headlines, leads = read_bbc_news('headline'), read_bbc_news('lead')
    assert leads.labels == headlines.labels
    assert all(
        lead.startswith(head.rstrip('.') + '. ') for head, lead in zip(headlines.texts, leads.texts, strict=True)
    )
    assert leads.texts[0] == (
        'Ad sales boost Time Warner profit. Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn '
        '(£600m) for the three months to December, from $639m year-earlier.'
    )


def test_article_parts():
    article = 'Title here\n\nFirst  paragraph\nwraps.\n\nSecond one.\n'
    assert article_text(article, 'headline') == 'Title here'
    assert article_text(article, 'lead') == 'Title here. First paragraph'
    assert article_text(article, 'article') == 'Title here. First paragraph wraps. Second one.'
    with pytest.raises(ValueError, match='field'):
        article_text(article, 'body')
    with pytest.raises(ValueError, match='empty'):
        article_text('\n\n')


def test_decode_falls_back_to_windows_1252():
    assert decode_article('£5'.encode()) == '£5'
    assert decode_article(b'\xa35') == '£5'


def test_drop_duplicates_keeps_first_and_refuses_conflicting_labels():
    assert drop_duplicates(['a', 'b', 'a', 'c', 'b'], [0, 1, 0, 2, 1]) == [0, 1, 3]
    with pytest.raises(ValueError, match="'a' occurs with labels 0 and 1"):
        drop_duplicates(['a', 'a'], [0, 1])


def test_labelled_texts_checks_its_fields():
    with pytest.raises(ValueError, match='2 texts but 1 labels'):
        LabelledTexts(('x', 'y'), (0,), ('a',))
    with pytest.raises(ValueError, match=r'labels \[3\] are out of range'):
        LabelledTexts(('x',), (3,), ('a', 'b'))


def test_split_is_stratified_disjoint_and_fixed():
    news = read_bbc_news()
    splits = split_texts(news, seed=0)
    assert {name: len(split) for name, split in splits.items()} == {'train': 1257, 'val': 419, 'test': 420}
    sets = {name: set(split.texts) for name, split in splits.items()}
    assert not (sets['train'] & sets['val'] or sets['train'] & sets['test'] or sets['val'] & sets['test'])
    assert sets['train'] | sets['val'] | sets['test'] == set(news.texts)
    overall = Counter(news.labels)
    for split in splits.values():
        counts = Counter(split.labels)
        for label, total in overall.items():
            assert abs(counts[label] - total * len(split) / len(news)) <= 1.5
    assert split_texts(news, seed=0)['test'].texts == splits['test'].texts
    with pytest.raises(ValueError, match='val_fraction'):
        split_texts(news, val_fraction=0.0)
    with pytest.raises(ValueError, match='below 1'):
        split_texts(news, val_fraction=0.5, test_fraction=0.5)


class _WordTokenizer:
    """Whitespace tokenizer with the Hugging Face call signature the loader uses: ids are word lengths."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        rows = [[101, *[len(w) for w in text.split()][: max_length - 2], 102] for text in texts]
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        return {'input_ids': ids, 'attention_mask': (ids != 0).long(), 'token_type_ids': torch.zeros_like(ids)}


def test_tokenize_and_trim_padding():
    data = LabelledTexts(('a bb ccc dddd eeeee', 'zz'), (1, 0), ('x', 'y'))
    dataset = tokenize_texts(data, _WordTokenizer(), max_length=4)
    assert dataset[0]['input_ids'].tolist() == [101, 1, 2, 102]
    assert dataset[1]['input_ids'].tolist() == [101, 2, 102, 0]
    assert dataset[1]['labels'].item() == 0
    batch = trim_padding([dataset[1], dataset[1]])
    assert batch['input_ids'].tolist() == [[101, 2, 102]] * 2
    assert batch['attention_mask'].tolist() == [[1, 1, 1]] * 2
    assert batch['labels'].tolist() == [0, 0]
    full = trim_padding([dataset[0], dataset[1]])
    assert full['input_ids'].shape == (2, 4)
