"""llm-foundry's ``teacher_signal`` dataloader: streams teacher-signal shards (see :mod:`composer_kd.signal`) so that
a stock llm-foundry YAML trains from them::

    train_loader:
      name: teacher_signal
      dataset: {remote: s3://bucket/signal, local: /tmp/signal, split: null, shuffle: true, max_seq_len: 2048}
      drop_last: true
      num_workers: 8

llm-foundry finds the builder through this package's ``llmfoundry_dataloaders`` entry point. The batches carry the
signal under the keys :class:`~composer_kd.signal.TeacherSignal` reads (``Distillation(TeacherSignal())``).
"""

from __future__ import annotations

import functools
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
            ``vocab_size``, ``shuffle``, ``shuffle_seed`` and any other ``StreamingDataset`` argument.
        drop_last, num_workers, pin_memory, prefetch_factor, persistent_workers, timeout: As for a PyTorch
            ``DataLoader`` (``prefetch_factor`` and ``persistent_workers`` apply only with workers).

    Returns:
        composer.core.DataSpec: The loader, counting tokens by ``attention_mask``.
    """
    from composer.core import DataSpec

    from composer_kd.signal.shards import SignalDataset, collate_signal

    if not isinstance(device_batch_size, int) or device_batch_size < 1:
        raise ValueError(f'teacher_signal: device_batch_size must be a positive integer, got {device_batch_size!r}.')
    options = dict(dataset)
    signal = SignalDataset(batch_size=device_batch_size, **options)
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
