"""MosaicML Streaming (MDS) shards holding token ids and, next to them, the teacher signal of every position; the
dataset that streams them back and the collate function that batches them.

One sample is one token sequence. Its columns (see :data:`SIGNAL_COLUMNS`):

- ``tokens`` (``ndarray:int32``): the token ids, as llm-foundry's text datasets store them;
- ``signal_values`` (``bytes``): ``len(tokens) * k`` kept teacher logits in ``signal_value_dtype``;
- ``signal_indices`` (``bytes``): their vocabulary indices, bit-packed
  (:func:`~composer_kd.signal.encoding.pack_indices`);
- ``signal_log_tail`` (``ndarray:float32``): ``logsumexp`` of each position's other ``V - k`` logits;
- ``signal_k``, ``signal_vocab_size`` (``int``), ``signal_value_dtype`` (``str``): how to read the rest.

Streaming is an optional dependency (``pip install 'composer-kd[llm]'``): it is imported here only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from composer_kd.signal.encoding import EncodedSignal, decode_signal

try:
    from streaming import StreamingDataset
except ImportError as e:  # pragma: no cover - the test environment has it
    raise ImportError(
        "The teacher signal is stored as MosaicML Streaming shards: install it with pip install 'composer-kd[llm]'."
    ) from e

__all__ = [
    'BATCH_KEYS',
    'SIGNAL_COLUMNS',
    'SignalDataset',
    'SETTINGS_FILE',
    'collate_signal',
    'read_signal_settings',
    'signal_sample',
]

#: The file next to the merged index that records how a signal was written and by which teacher.
SETTINGS_FILE = 'teacher_signal.json'

SIGNAL_COLUMNS = {
    'tokens': 'ndarray:int32',
    'signal_values': 'bytes',
    'signal_indices': 'bytes',
    'signal_log_tail': 'ndarray:float32',
    'signal_k': 'int',
    'signal_vocab_size': 'int',
    'signal_value_dtype': 'str',
}

# The keys :func:`collate_signal` adds to a causal LM batch; :class:`~composer_kd.signal.distill.TeacherSignal`
# reads them.
BATCH_KEYS = ('teacher_topk_indices', 'teacher_topk_logits', 'teacher_log_tail', 'teacher_vocab_size')


def signal_sample(tokens: np.ndarray, signal: EncodedSignal) -> dict[str, Any]:
    """One MDS sample (see :data:`SIGNAL_COLUMNS`) from a sequence's token ids and its encoded signal."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) != signal.positions:
        raise ValueError(f'tokens {tokens.shape} must be one sequence of the signal positions ({signal.positions}).')
    return {
        'tokens': tokens.astype(np.int32),
        'signal_values': signal.values,
        'signal_indices': signal.indices,
        'signal_log_tail': np.asarray(signal.log_tail, dtype=np.float32),
        'signal_k': signal.k,
        'signal_vocab_size': signal.vocab_size,
        'signal_value_dtype': signal.value_dtype,
    }


def _decode_sample(sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    tokens = np.asarray(sample['tokens'], dtype=np.int64)
    encoded = EncodedSignal(
        values=sample['signal_values'],
        indices=sample['signal_indices'],
        log_tail=sample['signal_log_tail'],
        positions=len(tokens),
        k=int(sample['signal_k']),
        vocab_size=int(sample['signal_vocab_size']),
        value_dtype=str(sample['signal_value_dtype']),
    )
    values, indices, log_tail = decode_signal(encoded)
    return {
        'input_ids': torch.from_numpy(tokens),
        'teacher_topk_indices': indices,
        'teacher_topk_logits': values,
        'teacher_log_tail': log_tail,
        'teacher_vocab_size': torch.tensor(encoded.vocab_size),
    }


def _check_local_shards(local: str) -> None:
    """Refuse a local folder without an index, or whose index names shard files that are not there."""
    import json

    index = os.path.join(local, 'index.json')
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f'No teacher signal at {local!r}: {index} does not exist. Write the shards first with '
            '`composer-kd teacher-signal`, or give remote= the object store URI they were written to.'
        )
    try:
        with open(index) as f:
            shards = json.load(f)['shards']
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f'The teacher signal at {local!r} has an unreadable index: {index} ({type(e).__name__}: {e}). Rerun '
            '`composer-kd teacher-signal` with the same options to write it again.'
        ) from e
    missing = [
        os.path.join(local, shard['raw_data']['basename'])
        for shard in shards
        if not os.path.isfile(os.path.join(local, shard['raw_data']['basename']))
        and not (shard.get('zip_data') and os.path.isfile(os.path.join(local, shard['zip_data']['basename'])))
    ]
    if missing:
        raise FileNotFoundError(
            f'The teacher signal at {local!r} is incomplete: {len(missing)} shard file(s) named in its index.json are '
            f'missing, e.g. {missing[0]}. Rerun `composer-kd teacher-signal` with the same options to finish it.'
        )


def read_signal_settings(local: Optional[str] = None, remote: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The ``teacher_signal.json`` of a signal (its options, ``teacher`` fingerprint and ``kept_mass``): read from
    ``local``, else fetched from ``remote`` into ``local`` (or a temporary folder); ``None`` where there is none.

    Raises:
        ValueError: If the file exists but is not JSON, naming it.
    """
    import json
    import tempfile

    path = None if local is None else os.path.join(local, SETTINGS_FILE)
    if (path is None or not os.path.isfile(path)) and remote is not None:
        from streaming.base.storage.download import CloudDownloader

        path = os.path.join(local or tempfile.mkdtemp(prefix='teacher-signal-'), SETTINGS_FILE)
        try:
            CloudDownloader.direct_download(f'{remote.rstrip("/")}/{SETTINGS_FILE}', path)
        except Exception:  # noqa: BLE001 - absent, or not reachable: nothing is known of it
            return None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f'{path} is not readable JSON ({e}).') from e


class SignalDataset(StreamingDataset):
    """A ``streaming.StreamingDataset`` of teacher-signal shards; each item is a dict of tensors.

    Items: ``input_ids [L]`` int64, ``teacher_topk_indices [L, k]`` int64, ``teacher_topk_logits [L, k]`` float32
    (the stored low-precision values, exactly), ``teacher_log_tail [L]`` float32, ``teacher_vocab_size`` (0-d).
    Streaming's own features (shuffling, mid-epoch resume through ``state_dict``, disjoint samples per rank and
    worker, ``remote=`` object stores) are the base class's.

    Args:
        local (str, optional): Local folder of the shards (or their cache, with ``remote``).
        remote (str, optional): Object-store URI (``s3://...``) of the shards.
        vocab_size (int, optional): The student's vocabulary size; a different one in the shards is an error.
        max_seq_len (int, optional): Cut sequences to this many tokens.
        **kwargs: Any other ``StreamingDataset`` argument (``shuffle``, ``batch_size``, ``shuffle_seed``, ...).

    Example:
        .. testcode::

            import tempfile
            import torch
            from composer_kd.signal.shards import SignalDataset
            from composer_kd.signal.writer import write_signal_shards

            folder = tempfile.mkdtemp()
            write_signal_shards(folder, torch.randint(0, 50, (4, 6)), torch.randn(4, 6, 50), k=3)
            dataset = SignalDataset(local=folder, vocab_size=50)
            assert dataset[0]['teacher_topk_indices'].shape == (6, 3)
    """

    def __init__(
        self,
        *,
        local: Optional[str] = None,
        remote: Optional[str] = None,
        vocab_size: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        **kwargs: Any,
    ):
        if remote is None and local is not None and kwargs.get('streams') is None:
            _check_local_shards(local)
        super().__init__(local=local, remote=remote, **kwargs)
        self.max_seq_len = max_seq_len
        first = self.get_item(0)
        self.k = int(first['signal_k'])
        self.vocab_size = int(first['signal_vocab_size'])
        self.value_dtype = str(first['signal_value_dtype'])
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} (the student's) does not match the teacher signal's vocabulary "
                f'({self.vocab_size} classes, at {remote or local!r}): the signal was written by a teacher with '
                'another vocabulary or tokenizer.'
            )

    @property
    def teacher_fingerprint(self) -> Optional[dict[str, Any]]:
        """What identifies the teacher that wrote the signal (``weights``, ``config``, ``tokenizer`` hashes, as
        :func:`~composer_kd.signal.identity.teacher_fingerprint` gives them), from its ``teacher_signal.json``;
        ``None`` for a signal without one (written by ``write_signal_shards``, or before teachers were recorded)."""
        if not hasattr(self, '_teacher_fingerprint'):
            settings = read_signal_settings(self.streams[0].local, self.streams[0].remote)
            self._teacher_fingerprint = None if settings is None else settings.get('teacher')
        return self._teacher_fingerprint

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = _decode_sample(super().__getitem__(index))
        if self.max_seq_len is not None:
            sample = {key: value[: self.max_seq_len] if value.ndim else value for key, value in sample.items()}
        return sample


def collate_signal(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Batch :class:`SignalDataset` items for a causal LM: ``input_ids``, ``attention_mask``, ``labels`` (the ids,
    ``-100`` at padding) and the signal keys (:data:`BATCH_KEYS`), padded on the right to the longest sequence.

    Args:
        samples (Sequence[dict]): Items of a :class:`SignalDataset`.
        pad_token_id (int, optional): Id written at padded positions. Default: ``0``.

    Returns:
        dict[str, torch.Tensor]: The batch; every tensor's first dimension is the batch, so Composer can split it
        into microbatches.
    """
    if not samples:
        raise ValueError('collate_signal needs at least one sample.')
    length = max(len(s['input_ids']) for s in samples)
    k = samples[0]['teacher_topk_indices'].shape[-1]
    n = len(samples)
    batch = {
        'input_ids': torch.full((n, length), pad_token_id, dtype=torch.long),
        'attention_mask': torch.zeros((n, length), dtype=torch.long),
        'labels': torch.full((n, length), -100, dtype=torch.long),
        'teacher_topk_indices': torch.zeros((n, length, k), dtype=torch.long),
        'teacher_topk_logits': torch.zeros((n, length, k), dtype=torch.float32),
        'teacher_log_tail': torch.zeros((n, length), dtype=torch.float32),
        'teacher_vocab_size': torch.stack([torch.as_tensor(s['teacher_vocab_size']) for s in samples]),
    }
    for row, sample in enumerate(samples):
        size = len(sample['input_ids'])
        if sample['teacher_topk_indices'].shape[-1] != k:
            raise ValueError(
                f'Samples of one batch keep different k ({k} and {sample["teacher_topk_indices"].shape[-1]}).'
            )
        batch['input_ids'][row, :size] = sample['input_ids']
        batch['attention_mask'][row, :size] = 1
        batch['labels'][row, :size] = sample['input_ids']
        batch['teacher_topk_indices'][row, :size] = sample['teacher_topk_indices']
        batch['teacher_topk_logits'][row, :size] = sample['teacher_topk_logits']
        batch['teacher_log_tail'][row, :size] = sample['teacher_log_tail']
    return batch
