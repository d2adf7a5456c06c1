"""Run a teacher once over token sequences and write its signal as MDS shards, resumably.

The output is a folder (or object-store URI) of parts ``part-00000/``, ``part-00001/``, ... each an MDS dataset of
``sequences_per_part`` sequences with its own ``index.json``, and a merged ``index.json`` at the top that
:class:`~composer_kd.signal.shards.SignalDataset` reads. A part is complete exactly when its ``index.json``
exists (Streaming writes it last), so an interrupted run started again with the same options skips the complete
parts and rewrites the one it was in. ``teacher_signal.json`` at the top records the options; a restart with
different ones is refused rather than mixing two signals.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from composer_kd.models.outputs import Key
from composer_kd.models.teachers import FrozenTeachers, teacher_logits
from composer_kd.signal.encoding import VALUE_DTYPES, check_k, encode_signal
from composer_kd.signal.shards import SIGNAL_COLUMNS, signal_sample

__all__ = [
    'SignalWriteSummary',
    'TokenSequences',
    'load_token_sequences',
    'write_signal_shards',
    'write_teacher_signal',
]

_SETTINGS_FILE = 'teacher_signal.json'


class TokenSequences:
    """Token sequences read by index: rows of a ``[N, L]`` array, or the ``tokens`` of an MDS dataset."""

    def __init__(self, rows: Any, source: str):
        self._rows = rows
        self.source = source

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> np.ndarray:
        row = self._rows[index]
        if isinstance(row, dict):  # an MDS sample
            tokens = row.get('tokens')
            if tokens is None:
                raise KeyError(f"{self.source}: MDS samples have no 'tokens' column (they have {sorted(row)}).")
            # llm-foundry stores ndarray:int32 columns; older datasets int64 bytes.
            row = np.frombuffer(tokens, dtype=np.int64) if isinstance(tokens, bytes) else tokens
        return np.asarray(row, dtype=np.int64)


def load_token_sequences(path: Union[str, os.PathLike, torch.Tensor, np.ndarray]) -> TokenSequences:
    """Token sequences from a tensor/array, a ``.pt``/``.npy`` file of one ``[N, L]`` integer array, or a local MDS
    folder whose samples have a ``tokens`` column (llm-foundry's tokenized text).

    Raises:
        FileNotFoundError: If the path does not exist, naming it.
        ValueError: If the array is not ``[N, L]`` integers.
    """
    if isinstance(path, (torch.Tensor, np.ndarray)):
        rows, source = path, 'tokens'
    else:
        source = os.fspath(path)
        if os.path.isdir(source):
            if not os.path.isfile(os.path.join(source, 'index.json')):
                raise FileNotFoundError(f'tokens: {source} is a folder without an MDS index.json.')
            from streaming import LocalDataset

            return TokenSequences(LocalDataset(local=source), source)
        if not os.path.isfile(source):
            raise FileNotFoundError(f'tokens: no such file or folder: {source}')
        rows = np.load(source) if source.endswith('.npy') else torch.load(source, map_location='cpu')
    rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(
            f'tokens: {source} must hold one [sequences, length] integer array, got {rows.dtype} {rows.shape}.'
        )
    return TokenSequences(rows, source)


@dataclass
class SignalWriteSummary:
    """What :func:`write_teacher_signal` did."""

    out: str
    sequences: int
    positions: int
    vocab_size: int
    k: int
    value_dtype: str
    parts_written: int
    parts_skipped: int


def _writer(out: Union[str, tuple[str, str]]) -> Any:
    from streaming import MDSWriter

    # keep_local: a part's local index marks it complete, which resuming relies on, object store or not.
    return MDSWriter(out=out, columns=SIGNAL_COLUMNS, size_limit=1 << 26, exist_ok=True, keep_local=True)


def write_signal_shards(
    out: str, tokens: torch.Tensor, logits: torch.Tensor, k: int, value_dtype: str = 'float16'
) -> None:
    """Write the signal of logits already computed (``[N, L, V]`` for token ids ``[N, L]``) as one MDS dataset.

    Args:
        out (str): Local folder or object-store URI.
        tokens (torch.Tensor): ``[N, L]`` token ids.
        logits (torch.Tensor): ``[N, L, V]`` teacher logits at those positions.
        k (int): Logits kept per position.
        value_dtype (str, optional): ``'float16'`` or ``'bfloat16'``. Default: ``'float16'``.
    """
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f'tokens {tuple(tokens.shape)} must be logits {tuple(logits.shape)} without the vocabulary.')
    with _writer(out) as writer:
        for row, row_logits in zip(tokens, logits, strict=True):
            writer.write(signal_sample(row.cpu().numpy(), encode_signal(row_logits, k, value_dtype)))


def _prepare_settings(local_root: str, settings: dict[str, Any], remote: Optional[str]) -> None:
    """Record ``settings`` in a new folder (and its object-store copy), or refuse a folder written with others."""
    path = os.path.join(local_root, _SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = sorted(key for key in set(before) | set(settings) if before.get(key) != settings.get(key))
            raise ValueError(
                f'{local_root} already holds a teacher signal written with other options: '
                + ', '.join(f'{key} {before.get(key)!r} then, {settings.get(key)!r} now' for key in changed)
                + '. Write to a new folder, or rerun with the same options to resume.'
            )
    else:
        os.makedirs(local_root, exist_ok=True)
        with open(path, 'w') as f:
            json.dump(settings, f, indent=2)
    if remote is not None:
        from streaming.base.storage.upload import CloudUploader

        CloudUploader.get((local_root, remote), exist_ok=True, keep_local=True).upload_file(_SETTINGS_FILE)


def _teacher_logits(
    teacher: nn.Module, ids: torch.Tensor, input_key: Optional[Key], logits_key: Optional[Key]
) -> torch.Tensor:
    """The teacher's float32 logits for ``[B, L]`` token ids, run as a fit runs its teachers."""
    batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids)}
    return teacher_logits([teacher], batch, input_key=input_key, logits_key=logits_key).float()


@dataclass
class _TeacherPass:
    """A teacher run once over token sequences, and how each batch's logits are kept.

    Args:
        teacher (nn.Module): The frozen teacher, on ``device``.
        sequences (TokenSequences): The token sequences.
        k (int): Logits kept per position.
        value_dtype (str): Precision of the kept logits.
        batch_size (int): Sequences per forward pass.
        input_key, logits_key: Choose the teacher's input and logits.
        device (str | torch.device): Where the teacher runs.
    """

    teacher: nn.Module
    sequences: TokenSequences
    k: int
    value_dtype: str
    batch_size: int
    input_key: Optional[Key]
    logits_key: Optional[Key]
    device: Union[str, torch.device]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return _teacher_logits(self.teacher, ids.to(self.device), self.input_key, self.logits_key)


def write_teacher_signal(
    teacher: nn.Module,
    tokens: Union[TokenSequences, str, os.PathLike, torch.Tensor, np.ndarray],
    out: str,
    k: int,
    *,
    value_dtype: str = 'float16',
    batch_size: int = 8,
    sequences_per_part: int = 1024,
    local_dir: Optional[str] = None,
    student_vocab_size: Optional[int] = None,
    tokenizer_size: Optional[int] = None,
    input_key: Optional[Key] = None,
    logits_key: Optional[Key] = None,
    device: Union[str, torch.device] = 'cpu',
    progress: bool = True,
) -> SignalWriteSummary:
    """Run ``teacher`` once over ``tokens`` and write each position's top-k logits and tail mass as MDS shards.

    Args:
        teacher (nn.Module): A causal LM (Hugging Face, Composer or plain) whose output holds ``[B, L, V]`` logits.
        tokens: Token sequences (see :func:`load_token_sequences`): equal lengths within a batch of ``batch_size``.
        out (str): Local folder or object-store URI (``s3://bucket/path``) to write to.
        k (int): Logits kept per position, ``1 <= k < V``.
        value_dtype (str, optional): Precision of the kept logits, ``'float16'`` or ``'bfloat16'``.
            Default: ``'float16'``.
        batch_size (int, optional): Sequences per teacher forward pass. Default: ``8``.
        sequences_per_part (int, optional): Sequences per resumable part. Default: ``1024``.
        local_dir (str, optional): With a URI ``out``, the local folder parts are staged in (keep it to resume).
            Default: a new temporary folder.
        student_vocab_size (int, optional): The student's vocabulary size; refused if the teacher's differs.
        tokenizer_size (int, optional): ``len(tokenizer)`` of the tokenizer that made ``tokens``; refused if larger
            than the teacher's vocabulary.
        input_key, logits_key: Choose the teacher's input and logits, as in :class:`~composer_kd.Distillation`.
        device (str | torch.device, optional): Where the teacher runs. Default: ``'cpu'``.
        progress (bool, optional): Show a progress bar. Default: ``True``.

    Returns:
        SignalWriteSummary: What was written and skipped.

    Raises:
        ValueError: ``k`` not below the teacher's vocabulary, a vocabulary or tokenizer mismatch, a token id outside
            the vocabulary, or a resumed folder written with other options.
    """
    sequences = _checked_sequences(tokens, value_dtype, batch_size, sequences_per_part)
    frozen = FrozenTeachers([teacher])
    frozen.freeze()
    teacher_pass = _TeacherPass(
        teacher.to(device), sequences, k, value_dtype, batch_size, input_key, logits_key, device
    )
    try:
        return _write(teacher_pass, out, sequences_per_part, local_dir, student_vocab_size, tokenizer_size, progress)
    finally:  # the caller's module gets back its train/eval modes and requires_grad flags
        frozen.restore()


def _checked_sequences(
    tokens: Union[TokenSequences, str, os.PathLike, torch.Tensor, np.ndarray],
    value_dtype: str,
    batch_size: Any,
    sequences_per_part: Any,
) -> TokenSequences:
    """The token sequences, refused when there are none, and the settings of their writing checked."""
    sequences = tokens if isinstance(tokens, TokenSequences) else load_token_sequences(tokens)
    if len(sequences) == 0:
        raise ValueError(f'tokens: {sequences.source} holds no sequences.')
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f'value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}.')
    for name, value in (('batch_size', batch_size), ('sequences_per_part', sequences_per_part)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f'{name} must be a positive integer, got {value!r}.')
    return sequences


def _write(
    teacher_pass: _TeacherPass,
    out: str,
    sequences_per_part: int,
    local_dir: Optional[str],
    student_vocab_size: Optional[int],
    tokenizer_size: Optional[int],
    progress: bool,
) -> SignalWriteSummary:
    """Write every part not yet complete, then the merged index; the parts already complete are counted."""
    from streaming.base.util import merge_index

    vocab = _vocabulary(teacher_pass, student_vocab_size, tokenizer_size)
    check_k(teacher_pass.k, vocab)
    sequences = teacher_pass.sequences
    remote = out if '://' in out else None
    local_root = out if remote is None else (local_dir or tempfile.mkdtemp(prefix='teacher-signal-'))
    settings = dict(
        k=teacher_pass.k,
        value_dtype=teacher_pass.value_dtype,
        vocab_size=vocab,
        sequences=len(sequences),
        sequences_per_part=sequences_per_part,
        source=sequences.source,
    )
    _prepare_settings(local_root, settings, remote)

    part_indices, written, skipped, positions = _write_parts(
        teacher_pass, local_root, remote, sequences_per_part, vocab, progress
    )
    merged = os.path.join(local_root, 'index.json')
    if os.path.isfile(merged):  # from an earlier complete run: merged again, as Streaming will not overwrite it
        os.remove(merged)
    merge_index(part_indices, local_root if remote is None else (local_root, remote))
    return SignalWriteSummary(
        out=out,
        sequences=len(sequences),
        positions=positions,
        vocab_size=vocab,
        k=teacher_pass.k,
        value_dtype=teacher_pass.value_dtype,
        parts_written=written,
        parts_skipped=skipped,
    )


def _write_parts(
    teacher_pass: _TeacherPass,
    local_root: str,
    remote: Optional[str],
    sequences_per_part: int,
    vocab: int,
    progress: bool,
) -> tuple[list[str], int, int, int]:
    """Write each part that is not complete yet; every part's index file, the numbers of parts written and
    skipped, and the number of positions in all of them."""
    from tqdm.auto import tqdm

    sequences = teacher_pass.sequences
    n_parts = -(-len(sequences) // sequences_per_part)
    written = skipped = positions = 0
    bar = tqdm(total=len(sequences), unit='seq', desc='teacher signal', disable=not progress)
    part_indices = []
    for part in range(n_parts):
        name = f'part-{part:05d}'
        local_part = os.path.join(local_root, name)
        part_indices.append(os.path.join(local_part, 'index.json'))
        first, last = part * sequences_per_part, min(len(sequences), (part + 1) * sequences_per_part)
        if os.path.isfile(part_indices[-1]):
            skipped += 1
            positions += sum(len(sequences[i]) for i in range(first, last))
            bar.update(last - first)
            continue
        destination = local_part if remote is None else (local_part, f'{remote.rstrip("/")}/{name}')
        positions += _write_part(teacher_pass, destination, range(first, last), vocab, bar)
        written += 1
    bar.close()
    return part_indices, written, skipped, positions


def _vocabulary(teacher_pass: _TeacherPass, student_vocab_size: Optional[int], tokenizer_size: Optional[int]) -> int:
    """The teacher's vocabulary size, checked against the student's and the tokenizer's.

    Read from one position of token 0, before any of the dataset's ids is checked against it.
    """
    vocab = teacher_pass.logits(torch.zeros((1, 1), dtype=torch.long)).shape[-1]
    if student_vocab_size is not None and student_vocab_size != vocab:
        raise ValueError(
            f"The teacher's vocabulary has {vocab} classes but student_vocab_size={student_vocab_size}: the stored "
            'indices would name other tokens. Use a teacher and student that share one tokenizer.'
        )
    if tokenizer_size is not None and tokenizer_size > vocab:
        raise ValueError(
            f'The tokenizer has {tokenizer_size} tokens but the teacher only {vocab} logits: it was not trained with '
            'this tokenizer.'
        )
    return vocab


def _write_part(
    teacher_pass: _TeacherPass, destination: Union[str, tuple[str, str]], rows: range, vocab: int, bar: Any
) -> int:
    """Write the signal of sequences ``rows`` as one part, from its start; the number of positions written.

    The part's index is written only after its last sample, so that only a complete part counts as written.
    """
    local_part = destination if isinstance(destination, str) else destination[0]
    shutil.rmtree(local_part, ignore_errors=True)  # an interrupted part is written again from its start
    # Not a `with` block: MDSWriter's __exit__ writes the index even when an exception (an interruption)
    # leaves it, which would mark a partial part complete.
    writer = _writer(destination)
    positions = 0
    try:
        for start in range(rows.start, rows.stop, teacher_pass.batch_size):
            batch = [teacher_pass.sequences[i] for i in range(start, min(rows.stop, start + teacher_pass.batch_size))]
            logits = teacher_pass.logits(_token_ids(batch, start, vocab))
            for row, row_logits in zip(batch, logits, strict=True):
                writer.write(signal_sample(row, encode_signal(row_logits, teacher_pass.k, teacher_pass.value_dtype)))
                positions += len(row)
            bar.update(len(batch))
    except BaseException:
        writer.cancel_future_jobs()
        bar.close()
        raise
    writer.finish()
    return positions


def _token_ids(rows: list[np.ndarray], start: int, vocab: int) -> torch.Tensor:
    """Sequences ``start, start + 1, ...`` as one ``[B, L]`` tensor, refused unless of one length and in the
    teacher's vocabulary."""
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f'tokens: sequences {start}..{start + len(rows) - 1} have different lengths.')
    ids = torch.as_tensor(np.stack(rows))
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f'tokens: sequences {start}..{start + len(rows) - 1} hold token id {int(ids.max())} outside '
            f"the teacher's vocabulary of {vocab}: the tokens were made by another tokenizer."
        )
    return ids
