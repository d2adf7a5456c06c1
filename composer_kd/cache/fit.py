"""A teacher cache during one fit: the example indices of each microbatch, and the events of the fit.

:meth:`.TeacherCache.start` binds the cache when a fit starts and returns a :class:`CachedFit`, which
``Distillation`` then hands the fit's events and asks for each microbatch's recorded logits. This module sits below
the cache's own: it needs of the cache only what :class:`FitCache` lists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Protocol, Union

import torch
from composer.core import Event, State

from composer_kd.cache.indices import detach_index, read_index
from composer_kd.models.outputs import Key

__all__ = ['CachedFit', 'FitCache']


class FitCache(Protocol):
    """What a :class:`CachedFit` uses of its cache: :class:`.TeacherCache` provides it."""

    #: The batch entry holding each example's index, or ``None`` when :class:`.IndexedDataset` attaches it.
    index_key: Optional[Key]

    def lookup(self, rows: torch.Tensor, device: Union[str, torch.device] = 'cpu') -> Optional[torch.Tensor]:
        """The recorded logits of ``rows`` on ``device``, or ``None`` unless every one of them is recorded."""

    def record(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Store ``logits[i]`` as example ``rows[i]``'s teacher output."""

    def exchange(self, to_device: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Share what each process recorded since the last exchange."""

    def flush(self) -> None:
        """Write what is recorded to disk."""


class CachedFit:
    """A :class:`.TeacherCache` during one fit: which examples each microbatch holds, and the fit's events.

    Made by :meth:`.TeacherCache.start`; ``Distillation`` hands it the events in :attr:`EVENTS` and asks it for
    each microbatch's recorded logits. The example indices come from :class:`.IndexedDataset` (taken off each batch
    before the student sees it and consumed microbatch by microbatch, as Composer splits batches into consecutive
    rows) or from the batch entry ``index_key``.

    Args:
        cache (TeacherCache): The bound cache.
        dataset_key (str, optional): The key :class:`.IndexedDataset` stores indices under, or ``None`` when they
            are read from the cache's ``index_key``.
    """

    #: The events of a fit the cache acts on.
    EVENTS = frozenset(
        {Event.AFTER_DATALOADER, Event.BEFORE_TRAIN_BATCH, Event.AFTER_TRAIN_BATCH, Event.EPOCH_END, Event.FIT_END}
    )

    def __init__(self, cache: FitCache, dataset_key: Optional[str]):
        self.cache = cache
        self.dataset_key = dataset_key
        self._batch_index: Optional[torch.Tensor] = None
        self._consumed = 0

    def on_event(self, event: Event, state: State) -> None:
        """Act on one of :attr:`EVENTS`."""
        if event is Event.AFTER_DATALOADER:
            if self.dataset_key is not None:
                state.batch, index = detach_index(state.batch, self.dataset_key)
                self._batch_index = index.to('cpu', torch.long)
                self._consumed = 0
        elif event is Event.BEFORE_TRAIN_BATCH:
            self._consumed = 0  # Composer is about to (re)run the batch's microbatches from the first
        elif event is Event.AFTER_TRAIN_BATCH:
            self._check_batch_used()
        elif event is Event.EPOCH_END:
            self.cache.exchange(state.device.tensor_to_device)
        elif event is Event.FIT_END:
            self.cache.flush()

    def microbatch_rows(self, state: State, n_rows: int) -> torch.Tensor:
        """The dataset indices of the current microbatch, whose logits have ``n_rows`` rows."""
        if self.dataset_key is None:
            rows = read_index(state.batch, self.cache.index_key)  # type: ignore[arg-type]
            if rows.numel() != n_rows:
                raise ValueError(
                    f'The batch entry index_key={self.cache.index_key!r} holds {rows.numel()} indices for a '
                    f'microbatch whose logits have {n_rows} rows.'
                )
            return rows.to('cpu', torch.long)
        if self._batch_index is None:
            raise RuntimeError('No example indices were taken from this batch (Event.AFTER_DATALOADER did not run).')
        start, self._consumed = self._consumed, self._consumed + n_rows
        if self._consumed > len(self._batch_index):
            raise ValueError(
                f'The microbatches of this batch have more rows ({self._consumed} so far) than the batch has example '
                f'indices ({len(self._batch_index)}): the teacher cache expects microbatches of consecutive rows, '
                'with logits of one row per example.'
            )
        return self._batch_index[start : self._consumed]

    def lookup(
        self, state: State, n_rows: int, device: Union[str, torch.device]
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The current microbatch's recorded logits on ``device`` (``None`` unless all are recorded), and its rows."""
        rows = self.microbatch_rows(state, n_rows)
        return self.cache.lookup(rows, device), rows

    def record(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Record the teachers' logits of ``rows`` (rows holding NaN or +inf are left out)."""
        self.cache.record(rows, logits)

    def _check_batch_used(self) -> None:
        """Check that the microbatches used every index of the batch (after they all ran)."""
        if self._batch_index is not None and self._consumed not in (0, len(self._batch_index)):
            raise ValueError(
                f"The microbatches used {self._consumed} of the batch's {len(self._batch_index)} example indices: "
                'the teacher cache expects microbatches of consecutive rows, with logits of one row per example.'
            )
