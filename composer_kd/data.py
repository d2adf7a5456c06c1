"""The demo's and the recipes' offline datasets, at their former path: they live in :mod:`composer_kd.recipes.data`.

``IGNORE_INDEX`` and ``cross_entropy_with_hidden_labels`` belong to :mod:`composer_kd.losses`, which the core
imports them from; every name is importable from here as before.
"""

from composer_kd.recipes.data import (
    DIGITS_CLASSES,
    DIGITS_SHAPE,
    DIGITS_TASKS,
    GLUE_TASKS,
    IGNORE_INDEX,
    DigitsSplits,
    GlueTask,
    MixedBatchSampler,
    MultiTaskDataset,
    TextClassificationDataset,
    cross_entropy_with_hidden_labels,
    describe_sizes,
    digits_multitask,
    glue_files,
    load_digits_splits,
    read_glue_split,
    synthetic_text_classification,
)

__all__ = [
    'DIGITS_CLASSES',
    'DIGITS_SHAPE',
    'DIGITS_TASKS',
    'GLUE_TASKS',
    'IGNORE_INDEX',
    'DigitsSplits',
    'GlueTask',
    'MixedBatchSampler',
    'MultiTaskDataset',
    'TextClassificationDataset',
    'cross_entropy_with_hidden_labels',
    'describe_sizes',
    'digits_multitask',
    'glue_files',
    'load_digits_splits',
    'read_glue_split',
    'synthetic_text_classification',
]
