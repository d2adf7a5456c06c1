"""BBC News by topic, read offline, at its former path: it lives in :mod:`composer_kd.recipes.text_data`."""

from composer_kd.recipes.text_data import (
    BBC_FIELDS,
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
