"""Teacher outputs recorded once per training example and read back afterwards: offline distillation.

A frozen teacher gives the same logits for the same input every epoch, so after the first epoch its forward pass
is pure repetition. :class:`.TeacherCache` records the (averaged) teacher logits of every example the first time it
is seen, keyed by the example's index in the training dataset, and later epochs read them back without running
the teacher at all. The index reaches the algorithm through :class:`.IndexedDataset` (which attaches it to every
example and is removed again before the student sees the batch) or through a batch entry the user names.
``Distillation(teacher_cache=...)`` only calls the cache at the right events.

The package has one module per concern; each imports only those listed before it:

- :mod:`~composer_kd.cache.topk`: top-k compression of logits and their reconstruction (:func:`.topk_compress`,
  :func:`.topk_logits`).
- :mod:`~composer_kd.cache.indices`: example indices in the batch (:class:`.IndexedDataset`,
  :func:`.indexed_collate`, :func:`.attach_index`, :func:`.detach_index`, :data:`.INDEX_KEY`).
- :mod:`~composer_kd.cache.augmentation`: finding random augmentation in the training data
  (:func:`.find_augmentation`).
- :mod:`~composer_kd.cache.errors`: :class:`.StaleTeacherCacheError`.
- :mod:`~composer_kd.cache.storage`: the table of recorded outputs, in memory or in memory-mapped ``.npy`` files,
  its layout and format version.
- :mod:`~composer_kd.cache.fingerprint`: what recorded outputs depend on (:func:`.cache_fingerprint`).
- :mod:`~composer_kd.cache.fit`: the cache during one fit (:class:`.CachedFit`).
- :mod:`~composer_kd.cache.teacher_cache`: the cache itself (:class:`.TeacherCache`), which builds on all of them.

Every name below is importable from ``composer_kd.cache``.
"""

from composer_kd.cache.augmentation import find_augmentation
from composer_kd.cache.errors import StaleTeacherCacheError
from composer_kd.cache.fingerprint import cache_fingerprint
from composer_kd.cache.fit import CachedFit
from composer_kd.cache.indices import (
    INDEX_KEY,
    IndexedDataset,
    IndexedSample,
    attach_index,
    detach_index,
    indexed_collate,
)
from composer_kd.cache.teacher_cache import TeacherCache
from composer_kd.cache.topk import topk_compress, topk_logits

__all__ = [
    'INDEX_KEY',
    'CachedFit',
    'IndexedDataset',
    'IndexedSample',
    'StaleTeacherCacheError',
    'TeacherCache',
    'attach_index',
    'cache_fingerprint',
    'detach_index',
    'find_augmentation',
    'indexed_collate',
    'topk_compress',
    'topk_logits',
]
