"""Token sequences for causal language models from MosaicML Streaming (MDS) shards, local or remote.

The shards hold one sequence of token ids per sample, as llm-foundry's text datasets store them: a ``tokens``
column of integer bytes, or an ``input_ids`` column. They are read through ``streaming.StreamingDataset`` (which
downloads a remote dataset's shards to a local cache as they are needed) and given to the trainers as a map-style
dataset of fixed-length examples, so that every trainer of a run sees the same batches in the same order.
MosaicML Streaming is imported only here, when a recipe names such data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from composer_kd.recipes.schema import MdsTokensSpec

__all__ = [
    'TOKEN_COLUMNS',
    'MdsTokenSequences',
    'decode_token_ids',
    'mds_columns',
    'mds_split_location',
    'resolve_token_column',
]

#: The columns a sample's token ids may be stored in, in the order they are looked for.
TOKEN_COLUMNS = ('tokens', 'input_ids')
#: Label of positions that are padding: ignored by the loss.
IGNORE_INDEX = -100


def _is_remote(path: str) -> bool:
    return '://' in path


def mds_split_location(spec: MdsTokensSpec, split: str) -> tuple[Optional[str], str]:
    """Where split ``split`` of the dataset is: ``(remote, local)`` as ``StreamingDataset`` takes them.

    A local dataset is read in place (no remote); a remote one is downloaded to ``spec.cache`` (by default a
    folder under the temporary directory, named after the URI, so that two datasets never share one).
    """
    path = str(spec.path)
    if not _is_remote(path):
        return None, os.path.join(os.path.expanduser(path), split)
    cache = spec.cache
    if cache is None:
        digest = hashlib.sha256(path.encode()).hexdigest()[:16]
        cache = os.path.join(tempfile.gettempdir(), 'composer_kd_mds', digest)
    return f'{path.rstrip("/")}/{split}', os.path.join(os.path.expanduser(cache), split)


def mds_columns(spec: MdsTokensSpec, split: str) -> dict[str, str]:
    """The columns of split ``split`` and their MDS encodings, read from its ``index.json``.

    Raises:
        FileNotFoundError: If the split has no ``index.json`` (locally, or at the remote URI).
    """
    remote, local = mds_split_location(spec, split)
    index = os.path.join(local, 'index.json')
    if remote is not None:
        from composer.utils import get_file

        os.makedirs(local, exist_ok=True)
        try:
            get_file(f'{remote}/index.json', index, overwrite=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f'{remote}/index.json') from e
    if not os.path.isfile(index):
        raise FileNotFoundError(index)
    with open(index) as f:
        shards = json.load(f).get('shards') or []
    if not shards:
        return {}
    return dict(zip(shards[0]['column_names'], shards[0]['column_encodings'], strict=True))


def resolve_token_column(columns: dict[str, str], column: Optional[str]) -> Optional[str]:
    """The column holding the token ids: ``column`` if the shards have it, else the first of
    :data:`TOKEN_COLUMNS` they have, else ``None``."""
    if column is not None:
        return column if column in columns else None
    return next((name for name in TOKEN_COLUMNS if name in columns), None)


def decode_token_ids(value: Any, dtype: str) -> np.ndarray:
    """A sample's token ids as a 1-D integer array: bytes are read as ``dtype`` integers (llm-foundry's
    ``tokens``), arrays and lists are taken as they are.

    Example:
        .. testcode::

            import numpy as np
            from composer_kd.recipes.mds_data import decode_token_ids

            assert decode_token_ids(np.array([5, 7], dtype=np.int64).tobytes(), 'int64').tolist() == [5, 7]
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(value, dtype=np.dtype(dtype))
    return np.asarray(value).reshape(-1)


class MdsTokenSequences(Dataset):
    """One split of an MDS token dataset as fixed-length causal-LM examples.

    Each example is ``{'input_ids', 'attention_mask', 'labels'}`` of ``max_seq_len`` positions: the sequence cut
    to that length, or padded (id 0, mask 0, label -100, so that padding counts neither as input nor in the loss).
    Labels are the input ids; the model shifts them to predict each next token.

    Args:
        spec (MdsTokensSpec): The recipe's ``data.mds`` section.
        split (str): The split's folder name.
        column (str): The column holding the token ids.
    """

    def __init__(self, spec: MdsTokensSpec, split: str, column: str):
        try:
            from streaming import StreamingDataset
        except ImportError as e:  # pragma: no cover - part of the llm extra
            raise ImportError('MDS datasets need mosaicml-streaming: pip install "composer-kd[llm]"') from e
        remote, local = mds_split_location(spec, split)
        self.split, self.column, self.dtype, self.max_seq_len = split, column, spec.token_dtype, spec.max_seq_len
        self.stream = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)

    def __len__(self) -> int:
        return len(self.stream)

    def token_ids(self, index: int) -> np.ndarray:
        """Sample ``index``'s token ids, whole (not cut to ``max_seq_len``)."""
        return decode_token_ids(self.stream[index][self.column], self.dtype)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.token_ids(index)[: self.max_seq_len].astype(np.int64))
        length = len(ids)
        input_ids = torch.zeros(self.max_seq_len, dtype=torch.long)
        input_ids[:length] = ids
        attention_mask = (torch.arange(self.max_seq_len) < length).long()
        labels = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)
        return {'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels}
