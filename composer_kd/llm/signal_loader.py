"""llm-foundry's ``teacher_signal`` dataloader: streams teacher-signal shards (see :mod:`composer_kd.signal`) so that
a stock llm-foundry YAML trains from them::

    train_loader:
      name: teacher_signal
      dataset: {remote: s3://bucket/signal, local: /tmp/signal, split: null, shuffle: true, max_seq_len: 2048}
      drop_last: true
      num_workers: 8

``split`` is a subfolder of ``remote`` / ``local``, as for llm-foundry's ``text`` loader: ``split: train`` reads the
shards at ``<local>/train`` (write the signal there to keep a ``text`` loader's ``split: train``); ``split: null``
reads the folder ``composer-kd teacher-signal`` wrote itself.

llm-foundry finds the builder through this package's ``llmfoundry_dataloaders`` entry point. The batches carry the
signal under the keys :class:`~composer_kd.signal.TeacherSignal` reads (``Distillation(TeacherSignal())``).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Union

from torch.utils.data import DataLoader

__all__ = ['build_teacher_signal_dataloader']


def build_teacher_signal_dataloader(
    tokenizer: Optional[Any],
    device_batch_size: Union[int, float],
    dataset: dict[str, Any],
    drop_last: bool = True,
    num_workers: int = 0,
    pin_memory: bool = True,
    prefetch_factor: Optional[int] = 2,
    persistent_workers: bool = True,
    timeout: int = 0,
) -> Any:
    """Build a Composer ``DataSpec`` over a :class:`~composer_kd.signal.shards.SignalDataset`, as llm-foundry's
    dataloader registry calls its builders (the config's entries as keywords, plus the tokenizer and batch size).

    Args:
        tokenizer: The student's tokenizer; its size must not exceed the signal's vocabulary, and its pad token
            pads short sequences. May be ``None`` (padding with 0).
        device_batch_size (int): Sequences per device batch.
        dataset (dict): ``SignalDataset`` arguments: ``local``, ``remote``, ``split``, ``max_seq_len``,
            ``vocab_size``, ``shuffle``, ``shuffle_seed`` and any other ``StreamingDataset`` argument. ``split``
            names a subfolder of ``remote`` / ``local`` holding the shards (``null``: the folder itself).
        drop_last, num_workers, pin_memory, prefetch_factor, persistent_workers, timeout: As for a PyTorch
            ``DataLoader`` (``prefetch_factor`` and ``persistent_workers`` apply only with workers).

    Returns:
        composer.core.DataSpec: The loader, counting tokens by ``attention_mask``.

    Raises:
        ValueError: If ``split`` names a subfolder that holds no signal while the folder above it does (a ``text``
            loader's ``split: train`` kept after its ``local`` was pointed at the signal), or, with ``remote``, if
            reading the split's ``index.json`` fails (the message says where ``split`` made it look).
    """
    from composer.core import DataSpec

    from composer_kd.models.rng import preserved_rng
    from composer_kd.signal.shards import SignalDataset, collate_signal

    if not isinstance(device_batch_size, int) or device_batch_size < 1:
        raise ValueError(f'teacher_signal: device_batch_size must be a positive integer, got {device_batch_size!r}.')
    options = _with_split(dict(dataset))
    # llm-foundry builds its loaders before the student: nothing here may move the generators it is built with.
    with preserved_rng():
        try:
            signal = SignalDataset(batch_size=device_batch_size, **options)
        except (FileNotFoundError, RuntimeError) as error:
            if options.get('split') is None:
                raise
            raise ValueError(f'{_split_message(options)} Reading it failed: {error}') from error
    pad_token_id = 0
    if tokenizer is not None:
        if len(tokenizer) > signal.vocab_size:
            raise ValueError(
                f'teacher_signal: the tokenizer has {len(tokenizer)} tokens but the signal at '
                f'{options.get("remote") or options.get("local")!r} was written by a teacher with {signal.vocab_size} '
                'classes: it was made with another tokenizer.'
            )
        if getattr(tokenizer, 'pad_token_id', None) is not None:
            pad_token_id = tokenizer.pad_token_id
    workers = {'prefetch_factor': prefetch_factor, 'persistent_workers': persistent_workers} if num_workers else {}
    loader = DataLoader(
        signal,
        batch_size=device_batch_size,
        collate_fn=functools.partial(collate_signal, pad_token_id=pad_token_id),  # picklable for workers
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        timeout=timeout,
        **workers,
    )
    return DataSpec(loader, get_num_tokens_in_batch=lambda batch: int(batch['attention_mask'].sum()))


def _split_message(options: dict[str, Any]) -> str:
    split, remote, local = options['split'], options.get('remote'), options.get('local')
    return (
        f'teacher_signal: dataset.split is {split!r}, so the shards are read from the subfolder {split!r} of '
        f"{remote or local!r} ({os.path.join(remote or local or '', split, 'index.json')}), as llm-foundry's text "
        'loader reads a split. If the signal was written to that folder itself (composer-kd teacher-signal --out), '
        'set split: null, or write the signal to the subfolder.'
    )


def _with_split(options: dict[str, Any]) -> dict[str, Any]:
    """Local shards of a ``split`` read from ``<local>/<split>``, checked first; other options as given.

    Streaming would report only a missing ``.../<split>/index.json``; the usual cause is a ``text`` loader's
    ``split: train`` kept when its ``local`` was pointed at the folder the signal was written to.
    """
    split, local = options.get('split'), options.get('local')
    if split is None or local is None or options.get('remote') is not None or options.get('streams') is not None:
        return options
    folder = os.path.join(local, split)
    if not os.path.isfile(os.path.join(folder, 'index.json')) and os.path.isfile(os.path.join(local, 'index.json')):
        raise ValueError(
            f'{_split_message(options)} Here {local!r} holds a signal (its index.json) and {folder!r} none.'
        )
    # The same folder Streaming would read, given as the folder itself so that its completeness is checked.
    return {**options, 'local': folder, 'split': None}
