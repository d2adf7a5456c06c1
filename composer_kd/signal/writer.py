"""Run a teacher once over token sequences and write its signal as MDS shards, resumably, from one process or many.

The output is a folder (or object-store URI) of parts ``part-00000/``, ``part-00001/``, ... each an MDS dataset of
``sequences_per_part`` sequences with its own ``index.json``, and a merged ``index.json`` at the top that
:class:`~composer_kd.signal.shards.SignalDataset` reads. A part is complete when its ``index.json`` (Streaming writes
it last) is readable and lists shard files that are all there with their sizes, so an interrupted run started again
with the same options skips the complete parts and rewrites the others, one whose index a kill cut short included.
``teacher_signal.json`` at the top records the options, the teacher's fingerprint and the mass the top k keep; a
restart with other options or another teacher is refused rather than mixing two signals. Under a launcher, part
``p`` is rank ``p % world_size``'s and rank zero merges the index: the same signal as one process writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from composer_kd.cache.topk import topk_compress
from composer_kd.models.outputs import Key
from composer_kd.models.sharding import is_sharded
from composer_kd.models.teachers import FrozenTeachers, teacher_logits
from composer_kd.signal.encoding import VALUE_DTYPES, EncodedSignal, check_k, encode_signal, encode_topk
from composer_kd.signal.identity import teacher_fingerprint
from composer_kd.signal.shards import SETTINGS_FILE, SIGNAL_COLUMNS, signal_sample

__all__ = [
    'KEPT_MASS_WARNING',
    'SignalWriteSummary',
    'TokenSequences',
    'load_token_sequences',
    'write_signal_shards',
    'write_teacher_signal',
]

_SETTINGS_FILE = SETTINGS_FILE

#: Below this mean probability kept by the top k, the writer warns: the tail, which the signal spreads evenly over
#: the other tokens, then holds most of the teacher's distribution (see docs/teacher_signal.md).
KEPT_MASS_WARNING = 0.5


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
    kept_mass: Optional[float] = None
    teacher: Optional[dict[str, Optional[str]]] = None


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


def _settings_differences(before: dict[str, Any], settings: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The options and the teacher fields in which a signal's recorded settings differ from this run's."""
    options = sorted(
        key
        for key in set(before) | set(settings)
        if key not in ('teacher', 'kept_mass') and before.get(key) != settings.get(key)
    )
    recorded = before.get('teacher') or {}
    teacher = [key for key in settings['teacher'] if recorded.get(key) != settings['teacher'][key]]
    return options, teacher


def _check_settings(local_root: str, before: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse to resume a signal written with other options or by another teacher, naming both."""
    options, teacher = _settings_differences(before, settings)
    if options:
        raise ValueError(
            f'{local_root} already holds a teacher signal written with other options: '
            + ', '.join(f'{key} {before.get(key)!r} then, {settings.get(key)!r} now' for key in options)
            + '. Write to a new folder, or rerun with the same options to resume.'
        )
    if teacher:
        recorded = before.get('teacher') or {}
        raise ValueError(
            f'{local_root} already holds a teacher signal written by another teacher: '
            + ', '.join(f'{key} {recorded.get(key)!r} then, {settings["teacher"][key]!r} now' for key in teacher)
            + '. Write to a new folder, or resume with the teacher (and tokenizer) that wrote it.'
        )


def _write_json(path: str, content: dict[str, Any]) -> None:
    """Write ``content`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    temporary = f'{path}.tmp-{os.getpid()}'
    with open(temporary, 'w') as f:
        json.dump(content, f, indent=2)
    os.replace(temporary, path)


def _upload(local_root: str, remote: Optional[str], filename: str) -> None:
    if remote is not None:
        from streaming.base.storage.upload import CloudUploader

        CloudUploader.get((local_root, remote), exist_ok=True, keep_local=True).upload_file(filename)


def _prepare_settings(local_root: str, settings: dict[str, Any], remote: Optional[str], ranks: _Ranks) -> None:
    """Record ``settings`` in a new folder (rank zero, and its object-store copy), then every rank refuses a
    folder written with other options or by another teacher; nothing is written before a refusal."""
    from composer_kd.signal.shards import read_signal_settings

    if ranks.rank == 0:
        os.makedirs(local_root, exist_ok=True)
        if read_signal_settings(local_root, remote) is None:  # a staging folder lost: the store's copy counts
            _write_json(os.path.join(local_root, _SETTINGS_FILE), settings)
            _upload(local_root, remote, _SETTINGS_FILE)
    ranks.barrier()
    before = read_signal_settings(local_root, remote)  # on another node: fetched from the object store
    if before is None:
        raise FileNotFoundError(f'{os.path.join(local_root, _SETTINGS_FILE)}: rank 0 wrote no settings file here.')
    _check_settings(local_root, before, settings)


@dataclass
class _Ranks:
    """The processes writing one signal: this one's global rank and their number."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def device(self, device: Union[str, torch.device]) -> torch.device:
        """``device``, or with several ranks and an accelerator named without an index, this rank's own one
        (``cuda`` is ``cuda:<LOCAL_RANK>``)."""
        device = torch.device(device)
        if self.world_size > 1 and device.type != 'cpu' and device.index is None:
            return torch.device(device.type, self.local_rank)
        return device

    def barrier(self) -> None:
        if self.world_size > 1:
            from composer.utils import dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        from composer.utils import dist

        return dist.all_gather_object(obj)


def _ranks(distributed: Optional[bool]) -> _Ranks:
    """The ranks of a launch by Composer's launcher or torchrun (``WORLD_SIZE``, ``RANK``), the process group
    started if the launcher did not; one rank with ``distributed=False`` or outside a launch."""
    from composer.utils import dist, get_device

    if distributed is False or dist.get_world_size() == 1:
        return _Ranks()
    if not dist.is_initialized():
        dist.initialize_dist(get_device(None))
    return _Ranks(dist.get_global_rank(), dist.get_world_size(), dist.get_local_rank())


class _Placement:
    """Runs a teacher on a device and gives it back where it was: the same parameter and buffer objects holding
    the same tensors, on their original devices (kept, not copied back, so nothing is lost or rounded)."""

    def __init__(self, teacher: nn.Module, device: Union[str, torch.device]):
        self.teacher = teacher
        self._saved = [
            (module, kind, name, tensor, tensor.data)
            for module in teacher.modules()
            for kind in ('_parameters', '_buffers')
            for name, tensor in getattr(module, kind).items()
            if tensor is not None
        ]
        target = torch.device(device)
        # A teacher dispatched with a device map (Accelerate's, e.g. from_pretrained(device_map='auto')) runs where
        # its map puts each part, its hooks moving the inputs: it stays where it is.
        dispatched = bool(getattr(teacher, 'hf_device_map', None))
        self.moved = not dispatched and any(tensor.device != target for *_, tensor, _ in self._saved)
        if self.moved:
            teacher.to(target)

    def restore(self) -> None:
        if not self.moved:
            return
        for module, kind, name, tensor, data in self._saved:
            getattr(module, kind)[name] = tensor
            if tensor.data is not data:
                tensor.data = data
        self.moved = False


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

    def encode(self, ids: torch.Tensor, vocab: int) -> tuple[list[EncodedSignal], float]:
        """Each sequence's encoded signal and the sum over its positions of the probability the top k keep.

        The top-k selection, the tail's ``logsumexp``, the cast to the stored precision and the kept mass are
        computed where the teacher ran; only ``[B, L, k]`` values and indices and ``[B, L]`` tails reach the host.
        """
        with torch.no_grad():
            values, indices, log_tail = topk_compress(self.logits(ids), self.k)
            top = torch.logsumexp(values, dim=-1)
            kept = torch.exp(top - torch.logaddexp(top, log_tail)).double().sum()
            stored = values.to(VALUE_DTYPES[self.value_dtype])
            stored, indices, log_tail, kept = stored.cpu(), indices.cpu(), log_tail.cpu(), float(kept)
        encoded = [
            encode_topk(stored[row], indices[row], log_tail[row], vocab, self.value_dtype) for row in range(len(ids))
        ]
        return encoded, kept


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
    tokenizer: Any = None,
    input_key: Optional[Key] = None,
    logits_key: Optional[Key] = None,
    device: Union[str, torch.device] = 'cpu',
    progress: bool = True,
    distributed: Optional[bool] = None,
    kept_mass_warning: float = KEPT_MASS_WARNING,
) -> SignalWriteSummary:
    """Run ``teacher`` once over ``tokens`` and write each position's top-k logits and tail mass as MDS shards.

    Under Composer's launcher or torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments: part
    ``p`` is written by rank ``p % world_size``, rank zero writes the settings and, once every rank is done, the
    merged index, and the result is the signal one process writes, byte for byte.

    A teacher too large for one device is accepted two ways: sharded across the writing ranks by FSDP version 2
    (:func:`~composer_kd.models.sharding.shard_teacher` on every rank; each rank makes as many forward passes as the
    busiest, since each pass gathers parameters from all of them), or dispatched over devices (and offloaded to the
    host or disk) with a device map by Accelerate in each process, left where its map puts it.

    Args:
        teacher (nn.Module): A causal LM (Hugging Face, Composer or plain) whose output holds ``[B, L, V]`` logits.
            Given back in the train/eval modes, ``requires_grad`` flags and on the devices it had.
        tokens: Token sequences (see :func:`load_token_sequences`): equal lengths within a batch of ``batch_size``.
        out (str): Local folder or object-store URI (``s3://bucket/path``) to write to.
        k (int): Logits kept per position, ``1 <= k < V``.
        value_dtype (str, optional): Precision of the kept logits, ``'float16'`` or ``'bfloat16'``.
            Default: ``'float16'``.
        batch_size (int, optional): Sequences per teacher forward pass. Default: ``8``.
        sequences_per_part (int, optional): Sequences per resumable part. Default: ``1024``.
        local_dir (str, optional): With a URI ``out``, the local folder parts are staged in (keep it to resume).
            Default: a new temporary folder (rank zero's, on every rank).
        student_vocab_size (int, optional): The student's vocabulary size; refused if the teacher's differs.
        tokenizer_size (int, optional): ``len(tokenizer)`` of the tokenizer that made ``tokens``; refused if larger
            than the teacher's vocabulary.
        tokenizer (optional): The tokenizer that made ``tokens``: recorded in the teacher's fingerprint.
        input_key, logits_key: Choose the teacher's input and logits, as in :class:`~composer_kd.Distillation`.
        device (str | torch.device, optional): Where the teacher runs; with several ranks, ``'cuda'`` is each
            rank's own GPU (``cuda:<LOCAL_RANK>``). A teacher with a device map stays where the map puts it, and this
            is only where its inputs are made. Default: ``'cpu'``.
        progress (bool, optional): Show a progress bar (rank zero's parts), with the kept mass so far. Default:
            ``True``.
        distributed (bool, optional): ``False`` writes from this process alone even under a launcher (call it on
            one rank only then). Default: share the work when ``WORLD_SIZE`` > 1.
        kept_mass_warning (float, optional): Warn when the mean probability the top ``k`` keep is below this.
            Default: ``0.5``.

    Returns:
        SignalWriteSummary: What was written and skipped (by all ranks).

    Raises:
        ValueError: ``k`` not below the teacher's vocabulary, a vocabulary or tokenizer mismatch, a token id outside
            the vocabulary, or a resumed folder written with other options or by another teacher.
    """
    sequences = _checked_sequences(tokens, value_dtype, batch_size, sequences_per_part)
    ranks = _ranks(distributed)
    device = ranks.device(device)
    frozen = FrozenTeachers([teacher])
    frozen.freeze()
    placement = None
    try:
        fingerprint = teacher_fingerprint(teacher, tokenizer)
        placement = _Placement(teacher, device)
        teacher_pass = _TeacherPass(teacher, sequences, k, value_dtype, batch_size, input_key, logits_key, device)
        return _write(
            teacher_pass,
            out,
            sequences_per_part,
            local_dir,
            student_vocab_size,
            tokenizer_size,
            progress,
            fingerprint,
            ranks,
            kept_mass_warning,
        )
    finally:  # the caller's module gets back its devices, train/eval modes and requires_grad flags
        if placement is not None:
            placement.restore()
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


def _local_root(out: str, local_dir: Optional[str], ranks: _Ranks) -> tuple[str, Optional[str]]:
    """The local folder the parts are written (or staged) in and the object-store URI, if any."""
    remote = out if '://' in out else None
    if remote is None:
        return out, None
    if local_dir is None:
        local_dir = ranks.gather(tempfile.mkdtemp(prefix='teacher-signal-') if ranks.rank == 0 else None)[0]
    return local_dir, remote


def _write(
    teacher_pass: _TeacherPass,
    out: str,
    sequences_per_part: int,
    local_dir: Optional[str],
    student_vocab_size: Optional[int],
    tokenizer_size: Optional[int],
    progress: bool,
    fingerprint: dict[str, Optional[str]],
    ranks: _Ranks,
    kept_mass_warning: float,
) -> SignalWriteSummary:
    """Write every part of this rank not yet complete, then (rank zero) the merged index and the kept mass."""
    vocab = _vocabulary(teacher_pass, student_vocab_size, tokenizer_size)
    check_k(teacher_pass.k, vocab)
    sequences = teacher_pass.sequences
    local_root, remote = _local_root(out, local_dir, ranks)
    settings = dict(
        k=teacher_pass.k,
        value_dtype=teacher_pass.value_dtype,
        vocab_size=vocab,
        sequences=len(sequences),
        sequences_per_part=sequences_per_part,
        source=sequences.source,
        teacher=fingerprint,
    )
    _prepare_settings(local_root, settings, remote, ranks)

    try:
        outcome: Union[_PartsWritten, str] = _write_parts(
            teacher_pass, local_root, remote, sequences_per_part, vocab, progress, ranks
        )
    except Exception as e:  # every rank learns of it, rather than waiting for the one that failed
        if ranks.world_size == 1:
            raise
        ranks.gather(f'{type(e).__name__}: {e}')
        raise
    gathered = ranks.gather(outcome)
    failed = [f'rank {rank}: {item}' for rank, item in enumerate(gathered) if isinstance(item, str)]
    if failed:
        raise RuntimeError('Writing the teacher signal failed on another rank: ' + '; '.join(failed))
    parts = {name: stats for item in gathered for name, stats in item.parts.items()}
    kept_mass = _kept_mass(parts)
    if ranks.rank == 0:
        _merge(local_root, remote, sorted(parts))
        _write_json(os.path.join(local_root, _SETTINGS_FILE), {**settings, 'kept_mass': kept_mass})
        _upload(local_root, remote, _SETTINGS_FILE)
        mean = kept_mass['mean']
        if mean is not None and mean < kept_mass_warning:
            warnings.warn(
                f'The top {teacher_pass.k} logits keep {mean:.3f} of the teacher probability on average (below '
                f'{kept_mass_warning}): most of the signal is the tail, spread evenly over the {vocab - teacher_pass.k}'
                ' other tokens. A larger k keeps more of the teacher (see docs/teacher_signal.md).',
                stacklevel=3,
            )
    ranks.barrier()  # every rank returns once the merged index exists
    return SignalWriteSummary(
        out=out,
        sequences=len(sequences),
        positions=sum(item.positions for item in gathered),
        vocab_size=vocab,
        k=teacher_pass.k,
        value_dtype=teacher_pass.value_dtype,
        parts_written=sum(item.written for item in gathered),
        parts_skipped=sum(item.skipped for item in gathered),
        kept_mass=kept_mass['mean'],
        teacher=fingerprint,
    )


def _kept_mass(parts: dict[str, Optional[dict[str, float]]]) -> dict[str, Any]:
    """The mean probability the top k keep, per part and over every position of the parts that record it."""
    known = {name: stats for name, stats in parts.items() if stats is not None}
    positions = sum(stats['positions'] for stats in known.values())
    return {
        'mean': sum(stats['kept_mass_sum'] for stats in known.values()) / positions if positions else None,
        'parts': {
            name: None if stats is None else stats['kept_mass_sum'] / stats['positions']
            for name, stats in sorted(parts.items())
        },
    }


def _merge(local_root: str, remote: Optional[str], names: list[str]) -> None:
    """Merge the parts' indexes into the top-level one (a part staged on another node is read from the store)."""
    from streaming.base.util import merge_index

    if remote is None:
        indices: list[Any] = [os.path.join(local_root, name, 'index.json') for name in names]
    else:
        indices = [
            (os.path.join(local_root, name, 'index.json'), f'{remote.rstrip("/")}/{name}/index.json') for name in names
        ]
    merged = os.path.join(local_root, 'index.json')
    if os.path.isfile(merged):  # from an earlier complete run: merged again, as Streaming will not overwrite it
        os.remove(merged)
    merge_index(indices, local_root if remote is None else (local_root, remote))


@dataclass
class _PartsWritten:
    """What one rank wrote: each of its parts' kept-mass statistics (``None`` where a part records none)."""

    parts: dict[str, Optional[dict[str, float]]]
    written: int
    skipped: int
    positions: int


def _write_parts(
    teacher_pass: _TeacherPass,
    local_root: str,
    remote: Optional[str],
    sequences_per_part: int,
    vocab: int,
    progress: bool,
    ranks: _Ranks,
) -> _PartsWritten:
    """Write each of this rank's parts that is not complete yet (part ``p`` is rank ``p % world_size``'s)."""
    from tqdm.auto import tqdm

    sequences = teacher_pass.sequences
    n_parts = -(-len(sequences) // sequences_per_part)
    mine = range(ranks.rank, n_parts, ranks.world_size)
    total = sum(min(len(sequences), (p + 1) * sequences_per_part) - p * sequences_per_part for p in mine)
    complete = {part: _complete_part(os.path.join(local_root, f'part-{part:05d}')) for part in mine}
    forward_passes = sum(
        -(
            -(min(len(sequences), (part + 1) * sequences_per_part) - part * sequences_per_part)
            // teacher_pass.batch_size
        )
        for part, stats in complete.items()
        if stats is False
    )
    padding = _forward_passes_to_pad(teacher_pass, forward_passes, ranks)
    done = _PartsWritten({}, 0, 0, 0)
    bar = tqdm(total=total, unit='seq', desc='teacher signal', disable=not progress or ranks.rank != 0)
    kept = positions = 0.0
    try:
        for part in mine:
            name = f'part-{part:05d}'
            local_part = os.path.join(local_root, name)
            first, last = part * sequences_per_part, min(len(sequences), (part + 1) * sequences_per_part)
            stats = complete[part]
            if stats is False:
                destination = local_part if remote is None else (local_part, f'{remote.rstrip("/")}/{name}')
                stats = _write_part(teacher_pass, destination, range(first, last), vocab, bar)
                done.written += 1
            else:
                done.skipped += 1
                bar.update(last - first)
            done.parts[name] = stats
            done.positions += sum(len(sequences[i]) for i in range(first, last))
            if stats is not None:
                kept, positions = kept + stats['kept_mass_sum'], positions + stats['positions']
                bar.set_postfix(kept_mass=f'{kept / positions:.3f}')
    finally:
        bar.close()
    for _ in range(padding):  # one position each: only the number of forward passes matters
        teacher_pass.logits(torch.zeros((1, 1), dtype=torch.long))
    return done


def _forward_passes_to_pad(teacher_pass: _TeacherPass, own: int, ranks: _Ranks) -> int:
    """How many forward passes this rank adds after its own ``own`` so that every rank makes as many as the busiest.

    The forward pass of a teacher sharded across the writing ranks gathers each unit's parameters from all of them,
    so every rank must make the same number; the parts (and, on resume, the parts left) seldom split evenly. Asked
    before any of them runs: a rank that ran out of passes first would wait in this exchange while another still
    gathers parameters.
    """
    if ranks.world_size == 1 or not is_sharded(teacher_pass.teacher):
        return 0
    return max(ranks.gather(own)) - own


_PART_STATS = 'signal_part.json'


def _complete_part(local_part: str) -> Union[bool, Optional[dict[str, float]]]:
    """``False`` unless the part is complete: its ``index.json`` readable and every shard it lists present with
    the listed size (a kill while Streaming wrote the index leaves it empty or cut); else the part's kept-mass
    statistics (``None`` for a part written before they were recorded). An incomplete index is reported."""
    index = os.path.join(local_part, 'index.json')
    if not os.path.isfile(index):
        return False
    try:
        with open(index) as f:
            shards = json.load(f)['shards']
        for shard in shards:
            raw = os.path.join(local_part, shard['raw_data']['basename'])
            key = 'raw_data' if os.path.isfile(raw) or not shard.get('zip_data') else 'zip_data'
            path, size = os.path.join(local_part, shard[key]['basename']), shard[key]['bytes']
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise ValueError(f'shard {path} is missing or not of the {size} bytes listed')
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(
            f'{index} is unreadable or incomplete ({type(e).__name__}: {e}): writing its part again.', stacklevel=2
        )
        return False
    path = os.path.join(local_part, _PART_STATS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


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
) -> dict[str, float]:
    """Write the signal of sequences ``rows`` as one part, from its start; its positions and the sum over them of
    the probability the top k keep (also written to the part's ``signal_part.json``, before its index).

    The part's index is written only after its last sample, so that only a complete part counts as written.
    """
    local_part = destination if isinstance(destination, str) else destination[0]
    shutil.rmtree(local_part, ignore_errors=True)  # an interrupted part is written again from its start
    # Not a `with` block: MDSWriter's __exit__ writes the index even when an exception (an interruption)
    # leaves it, which would mark a partial part complete.
    writer = _writer(destination)
    positions, kept = 0, 0.0
    try:
        for start in range(rows.start, rows.stop, teacher_pass.batch_size):
            batch = [teacher_pass.sequences[i] for i in range(start, min(rows.stop, start + teacher_pass.batch_size))]
            encoded, batch_kept = teacher_pass.encode(_token_ids(batch, start, vocab), vocab)
            for row, signal in zip(batch, encoded, strict=True):
                writer.write(signal_sample(row, signal))
                positions += len(row)
            kept += batch_kept
            bar.update(len(batch))
        stats = {'positions': positions, 'kept_mass_sum': kept}
        _write_json(os.path.join(local_part, _PART_STATS), stats)
    except BaseException:
        writer.cancel_future_jobs()
        raise
    writer.finish()
    return stats


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
