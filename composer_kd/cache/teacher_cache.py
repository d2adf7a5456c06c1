"""The teacher cache: teacher logits recorded per training example on first sight and read back afterwards.

:class:`TeacherCache` binds itself to a fingerprint (:mod:`~composer_kd.cache.fingerprint`), keeps its outputs in
a table (:mod:`~composer_kd.cache.storage`), refuses randomly augmented data
(:mod:`~composer_kd.cache.augmentation`), shares what each process recorded, and hands a fit its
:class:`.CachedFit`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Precision, State
from composer.utils import dist, get_device
from torch import nn

from composer_kd.cache.augmentation import refuse_augmentation
from composer_kd.cache.errors import StaleTeacherCacheError
from composer_kd.cache.fingerprint import cache_fingerprint, differences
from composer_kd.cache.fit import CachedFit
from composer_kd.cache.indices import IndexedDataset, check_indices, detach_index, read_index
from composer_kd.cache.storage import (
    STORAGE_DTYPES,
    CacheTable,
    all_gather_rows,
    create_disk_table,
    decode_logits,
    disk_table,
    encode_logits,
    memory_table,
    read_meta,
    table_layout,
)
from composer_kd.models.outputs import Key, poisoned_rows
from composer_kd.models.teachers import FrozenTeachers, resolve_teacher_logits_key, teacher_logits

__all__ = ['TeacherCache']


class TeacherCache:
    """Teacher logits recorded per training example on first sight, so later epochs never run the teacher.

    Pass it to ``Distillation(teachers, teacher_cache=TeacherCache(...))``. The first time an example is
    distilled, the teachers run as usual and their (averaged) logits are stored under the example's index in the
    training dataset; every later time they are read back, and a microbatch whose examples are all stored skips
    the teachers entirely. Outputs can also be recorded before training with :meth:`precompute`.

    **Where the index comes from.** Wrap the training dataset in :class:`.IndexedDataset`: each example carries its
    index, ``Distillation`` takes it off the batch before the student sees it, and slices it per microbatch as
    Composer splits the batch (consecutive rows). Or name a batch entry that already holds it with
    ``index_key`` (e.g. a dataset's ``'idx'`` column), which is then read from every microbatch and left in place.
    The index is the example's position in the whole dataset, so it is the same on every process, whatever the
    sampler or shuffling.

    **Storage.** Without ``path`` the outputs live in CPU memory and are saved in training checkpoints (so a run
    resumed with ``load_path`` reads exactly what it would have read uninterrupted); the checkpoint grows by the
    cache's size. With ``path`` they are memory-mapped ``.npy`` files in that folder (``values.npy``, with top-k
    also ``indices.npy`` and ``tail.npy``, and ``filled.npy`` marking recorded rows), plus ``meta.json`` holding
    the fingerprint; they persist across runs and checkpoints only name them. Several processes on one machine
    share one folder; on several machines give each its own local folder.

    **Top-k.** With ``top_k`` only the ``k`` largest logits of each position are kept (values in ``dtype``,
    classes as int32) and, with ``tail='uniform'``, the float32 ``logsumexp`` of the others; the loss receives
    dense logits rebuilt by :func:`.topk_logits` (the other classes share the remaining mass evenly; exact at
    temperature 1), or, with ``tail='drop'``, the kept classes renormalized.

    **Fingerprint.** The cache is bound to what its outputs depend on (:func:`.cache_fingerprint`: the teachers'
    weights, the dataset's length and a sample of its examples, top-k, dtype, precision, keys). A folder or
    checkpoint recorded under another fingerprint is refused with :class:`.StaleTeacherCacheError`, naming the path
    and each differing field; it is never used.

    **Augmentation.** Recorded outputs are those of the inputs seen the first time. With random augmentation,
    later epochs present other inputs, and the cached outputs would teach the student the teacher's answer to an
    input it is not looking at. So the cache refuses to run when :func:`.find_augmentation` finds a random
    transform on the training dataset or a Composer algorithm that changes the batch before the forward pass,
    unless ``allow_augmentation=True`` (then the student is deliberately distilled on the first-epoch versions'
    outputs; list ``Distillation`` after such algorithms, so that it takes the index off the batch before them).

    Non-finite (NaN or +inf) teacher outputs are never stored; ``on_nonfinite_teacher`` treats them as without
    a cache, and the teacher runs again the next time those examples come. Recording copies each microbatch's
    outputs to the host, a synchronization the first epoch pays once per microbatch.

    Args:
        path (str, optional): A folder for memory-mapped files. Default: ``None``, keep the outputs in memory.
        top_k (int, optional): Keep only the ``k`` largest logits per position. Default: ``None``, all.
        tail (str, optional): With ``top_k``, ``'uniform'`` (spread the remaining mass evenly over the other
            classes) or ``'drop'`` (renormalize over the kept ones). Default: ``'uniform'``.
        dtype (torch.dtype, optional): Storage type of the logits: ``torch.float32`` (bitwise what the teacher
            gave, for float32 teachers), ``torch.bfloat16`` or ``torch.float16`` (half the size; float16 refuses
            logits beyond its range). Default: ``torch.float32``.
        index_key (int | str | Callable, optional): Read each example's index from this batch entry (as Composer's
            ``batch_get`` takes it) instead of from an :class:`.IndexedDataset`. Default: ``None``.
        allow_augmentation (bool, optional): Record and reuse outputs even though the data are randomly
            augmented. Default: ``False``.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import DataLoader, TensorDataset
            from composer import Trainer
            from composer.models import ComposerClassifier
            from composer_kd import Distillation, IndexedDataset, TeacherCache

            data = IndexedDataset(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))))
            teacher = torch.nn.Linear(4, 3)
            trainer = Trainer(
                model=ComposerClassifier(torch.nn.Linear(4, 3), num_classes=3),
                train_dataloader=DataLoader(data, batch_size=8, shuffle=True),
                max_duration='2ep',
                algorithms=[Distillation(teacher, teacher_cache=TeacherCache())],
            )
            trainer.fit()  # the teacher ran 4 times (epoch 1), not 8
    """

    def __init__(
        self,
        path: Optional[Union[str, os.PathLike]] = None,
        top_k: Optional[int] = None,
        tail: str = 'uniform',
        dtype: torch.dtype = torch.float32,
        index_key: Optional[Key] = None,
        allow_augmentation: bool = False,
    ):
        if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
            raise ValueError(f'top_k must be a positive integer or None, got {top_k!r}.')
        if tail not in ('uniform', 'drop'):
            raise ValueError(f"tail must be 'uniform' or 'drop', got {tail!r}.")
        if dtype not in STORAGE_DTYPES.values():
            raise ValueError(f'dtype must be one of {sorted(STORAGE_DTYPES)} (as torch dtypes), got {dtype!r}.')
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        self.top_k = top_k
        self.tail = tail
        self.dtype = dtype
        self.index_key = index_key
        self.allow_augmentation = allow_augmentation

        self._fingerprint: Optional[dict[str, Any]] = None
        self._n_rows = 0
        self._row_shape: Optional[tuple[int, ...]] = None
        self._table: Optional[CacheTable] = None
        self._restored: Optional[dict[str, Any]] = None  # a checkpoint's cache, until the fit binds it
        self._unshared: list[torch.Tensor] = []  # rows recorded here since the processes last exchanged theirs

    def __repr__(self) -> str:
        where = 'memory' if self.path is None else repr(self.path)
        return f'TeacherCache({where}, top_k={self.top_k}, dtype={str(self.dtype).removeprefix("torch.")})'

    # ---- state --------------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> Optional[dict[str, Any]]:
        """What the recorded outputs were bound to (see :func:`.cache_fingerprint`); ``None`` before binding."""
        return self._fingerprint

    @property
    def n_recorded(self) -> int:
        """How many examples have a recorded output."""
        return 0 if self._table is None else int(self._table.filled.sum())

    def contains(self, rows: torch.Tensor) -> bool:
        """Whether every example in ``rows`` (dataset indices) has a recorded output."""
        return self._table is not None and bool(self._table.filled[rows.to('cpu', torch.long)].all())

    def clear(self) -> None:
        """Forget the outputs held in memory and the binding (files on disk are left as they are)."""
        self._fingerprint, self._table, self._row_shape, self._restored, self._unshared = None, None, None, None, []

    def _where(self) -> str:
        return f'teacher cache folder {self.path!r}' if self.path is not None else 'in-memory teacher cache'

    def bind(self, fingerprint: dict[str, Any], n_rows: int) -> None:
        """Tie the cache to ``fingerprint``: open a matching folder, or refuse a stale one, memory or checkpoint.

        Raises:
            StaleTeacherCacheError: If recorded outputs exist under another fingerprint; the message names where
                they are and every differing field.
        """
        if self._restored is not None:
            restored, self._restored = self._restored, None
            changed = differences(restored['fingerprint'], fingerprint)
            if changed:
                self._table, self._row_shape = None, None  # never to be used, not even by a later fit
                raise StaleTeacherCacheError(
                    f'The {self._where()} saved in the checkpoint was recorded for another teacher or data '
                    f'({"; ".join(changed)}); it is not used. Resume with the teacher and data it was recorded '
                    'with, or load the checkpoint with load_exclude_algorithms=["Distillation"].'
                )
            self._fingerprint = restored['fingerprint']
        if self._fingerprint is not None and self._fingerprint != fingerprint:
            raise StaleTeacherCacheError(
                f'The {self._where()} holds outputs recorded for another teacher or data '
                f'({"; ".join(differences(self._fingerprint, fingerprint))}); it is not used. Call clear() on it or '
                'use a new TeacherCache.'
            )
        self._n_rows = n_rows
        if self.path is not None:
            self._bind_folder(fingerprint)
        self._fingerprint = fingerprint

    def _bind_folder(self, fingerprint: dict[str, Any]) -> None:
        assert self.path is not None
        meta = read_meta(self.path)
        if meta is None:
            self._table, self._row_shape = None, None  # nothing recorded there (yet, or any more)
            return
        changed = differences(meta.get('fingerprint', {}), fingerprint)
        if changed:
            raise StaleTeacherCacheError(
                f'The teacher cache at {self.path!r} was recorded for another teacher or data and is not used: '
                f'{"; ".join(changed)}. Delete that folder (or pass another path) to record a new cache.'
            )
        if self._table is None:
            self._open_folder(meta)

    def _open_folder(self, meta: Mapping[str, Any]) -> None:
        """Open the files a folder's ``meta.json`` describes."""
        assert self.path is not None
        self._row_shape = tuple(meta['row_shape'])
        self._table = disk_table(self.path, self._layout(), create=False)

    def _layout(self) -> dict:
        assert self._row_shape is not None
        return table_layout(self._n_rows, self._row_shape, self.top_k, self.tail, self.dtype)

    def _create_table(self, row_shape: tuple[int, ...]) -> None:
        self._row_shape = row_shape
        if self.path is None:
            self._table = memory_table(self._layout())
            return
        meta = {'fingerprint': self._fingerprint, 'row_shape': list(row_shape), 'n_rows': self._n_rows}
        self._table = create_disk_table(self.path, self._layout(), meta)

    def state_dict(self) -> dict[str, Any]:
        """The binding and, for an in-memory cache, every recorded output (a disk cache is only named)."""
        state: dict[str, Any] = {'fingerprint': self._fingerprint, 'path': self.path}
        if self.path is None and self._table is not None:
            rows = self._table.filled.nonzero().flatten()
            state.update(row_shape=self._row_shape, n_rows=self._n_rows, rows=rows, arrays=self._table.read(rows))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take a checkpoint's cache; it is checked against the fit's fingerprint when the fit starts."""
        if state.get('fingerprint') is None:
            return
        if (state.get('path') is None) != (self.path is None):
            kind = 'in memory' if state.get('path') is None else f'in {state.get("path")!r}'
            raise ValueError(f'The checkpoint recorded its teacher cache {kind}, but this TeacherCache is {self!r}.')
        self._restored = {'fingerprint': state['fingerprint']}
        if self.path is None and state.get('rows') is not None:
            self._n_rows, self._row_shape = int(state['n_rows']), tuple(state['row_shape'])
            self._table = memory_table(self._layout())
            self._table.write(state['rows'], state['arrays'])
            self._unshared = []

    # ---- recording and reading ----------------------------------------------------------------------------

    def lookup(self, rows: torch.Tensor, device: Union[str, torch.device] = 'cpu') -> Optional[torch.Tensor]:
        """The recorded logits of ``rows`` on ``device``, or ``None`` unless every one of them is recorded.

        Full logits come back in the storage dtype; top-k ones as dense float32 logits (see
        :func:`.topk_logits`).
        """
        rows = check_indices(rows, self._n_rows)
        if self._table is None or not bool(self._table.filled[rows].all()):
            return None
        arrays = {name: array.to(device, non_blocking=True) for name, array in self._table.read(rows).items()}
        assert self._row_shape is not None
        return decode_logits(arrays, self.top_k, self._row_shape[-1])

    def record(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Store ``logits[i]`` as example ``rows[i]``'s teacher output, unless recorded or not finite.

        Raises:
            ValueError: If the logits per example do not have the shape the cache holds, or ``dtype`` cannot hold
                them.
        """
        rows = check_indices(rows, self._n_rows)
        if logits.shape[0] != rows.numel():
            raise ValueError(f'{rows.numel()} example indices for teacher logits of shape {tuple(logits.shape)}.')
        row_shape = tuple(logits.shape[1:])
        if self._table is None:
            if not row_shape:
                raise ValueError('Teacher logits must have a class dimension; got one number per example.')
            if self.top_k is not None and not self.top_k < row_shape[-1]:
                raise ValueError(
                    f'top_k={self.top_k} must be smaller than the number of classes ({row_shape[-1]}); use top_k=None.'
                )
            self._create_table(row_shape)
        elif row_shape != self._row_shape:
            raise ValueError(
                f'Teacher logits per example have shape {row_shape}, but the {self._where()} holds {self._row_shape}: '
                'every example must give one shape (pad sequences to a fixed length).'
            )
        assert self._table is not None
        logits = logits.detach()
        bad = poisoned_rows(logits)
        data = encode_logits(logits, self.top_k, self.tail, self.dtype)
        keep = (~bad).to('cpu') & ~self._table.filled[rows]
        if not bool(keep.any()):
            return
        rows = rows[keep]
        self._table.write(rows, {name: array.to('cpu')[keep] for name, array in data.items()})
        self._unshared.append(rows)

    def flush(self) -> None:
        """Write what is recorded to disk (a no-op in memory)."""
        if self._table is not None:
            self._table.flush()

    # ---- several processes --------------------------------------------------------------------------------

    def exchange(self, to_device: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Share what each process recorded since the last exchange, so every process holds every row.

        In memory, the new rows are all-gathered (in chunks of at most 64 MiB) and stored by every process. On
        disk, processes write into the same files; here they flush them and wait for each other. A no-op in a
        single process. Every process must call it at the same point (``Distillation`` does at each epoch end).

        Args:
            to_device (Callable): Moves a tensor where the process group communicates (the GPU for NCCL).
        """
        if dist.get_world_size() == 1:
            self._unshared = []
            return
        if self.path is not None:
            self.flush()
            dist.barrier()
            self._unshared = []
            meta = read_meta(self.path) if self._table is None else None
            if meta is not None:
                self._open_folder(meta)
            return
        rows = torch.cat(self._unshared) if self._unshared else torch.zeros(0, dtype=torch.long)
        self._unshared = []
        counts = [int(c) for c in dist.all_gather(to_device(torch.tensor([rows.numel()])))]
        shapes = dist.all_gather_object(None if self._row_shape is None else list(self._row_shape))
        row_shape = next((tuple(s) for s in shapes if s is not None), None)
        if max(counts) == 0 or row_shape is None:
            return
        if self._table is None:
            self._create_table(row_shape)
        assert self._table is not None
        all_gather_rows(self._table, rows, to_device, counts)

    # ---- inside a Composer fit ----------------------------------------------------------------------------

    def start(
        self,
        state: State,
        teachers: Sequence[nn.Module],
        *,
        input_key: Optional[Key] = None,
        logits_key: Optional[Key] = None,
        teacher_dtype: Optional[torch.dtype] = None,
        algorithms: Sequence[Any] = (),
    ) -> CachedFit:
        """Check the training data, bind the cache at the start of a fit, and return what drives it during the fit.

        ``Distillation`` calls it when a fit starts and hands the events of the fit to the returned object.

        Returns:
            CachedFit: The cache's state for this fit.

        Raises:
            ValueError: If the data are randomly augmented (the message names the transform or algorithm) and
                ``allow_augmentation`` is off, or no example index can be found.
            StaleTeacherCacheError: If recorded outputs belong to another fingerprint.
        """
        dataset = getattr(state.train_dataloader, 'dataset', None)
        if dataset is None or not hasattr(dataset, '__len__') or not hasattr(dataset, '__getitem__'):
            raise ValueError(
                'teacher_cache needs a training DataLoader over a map-style dataset (with __len__ and __getitem__) to '
                f'key outputs by example; got {type(state.train_dataloader).__name__} over {type(dataset).__name__}.'
            )
        index_from_dataset = isinstance(dataset, IndexedDataset) and self.index_key is None
        if not index_from_dataset and self.index_key is None:
            raise ValueError(
                "teacher_cache needs each example's dataset index: wrap the training dataset in "
                'IndexedDataset(dataset) (the index is removed before the student sees the batch), or name a batch '
                'entry holding it with TeacherCache(index_key=...).'
            )
        self._refuse_augmentation(dataset, algorithms, state)
        self._bind_to(
            teachers,
            dataset,
            precision=state.precision,
            teacher_dtype=teacher_dtype,
            input_key=input_key,
            logits_key=logits_key,
        )
        return CachedFit(self, dataset.key if index_from_dataset else None)

    def _bind_to(self, teachers: Sequence[nn.Module], dataset: Any, **settings: Any) -> None:
        """Bind to the fingerprint of ``teachers`` and ``dataset`` under this cache's top-k, tail and dtype.

        ``settings`` are the fit's: ``precision``, ``teacher_dtype``, ``input_key`` and ``logits_key``, as
        :func:`.cache_fingerprint` takes them.
        """
        fingerprint = cache_fingerprint(
            teachers, dataset, top_k=self.top_k, tail=self.tail, dtype=self.dtype, **settings
        )
        self.bind(fingerprint, len(dataset))

    def _refuse_augmentation(self, dataset: Any, algorithms: Sequence[Any], state: Optional[State]) -> None:
        if not self.allow_augmentation:
            refuse_augmentation(dataset, algorithms, state)

    # ---- before training ----------------------------------------------------------------------------------

    def precompute(
        self,
        teachers: Union[nn.Module, Sequence[nn.Module]],
        dataloader: Any,
        *,
        device: Optional[str] = None,
        precision: Union[str, Precision] = 'fp32',
        input_key: Optional[Key] = None,
        student_logits_key: Optional[Key] = None,
        teacher_logits_key: Optional[Key] = None,
    ) -> TeacherCache:
        """Record the teachers' (averaged) logits for every example ``dataloader`` yields, before training.

        The settings must be those the fit will use (``Trainer(precision=...)``, ``Distillation(input_key=...,
        student_logits_key=..., teacher_logits_key=...)``, and no ``teacher_inference`` dtype), or the fit refuses the
        cache as recorded for other settings. Examples already recorded are skipped. Teachers are run in eval mode
        without gradients and given back in the mode they had; they are moved to ``device``. With several processes,
        call it on every process: each records what its dataloader yields, then they share it (see :meth:`exchange`).

        Args:
            teachers (nn.Module | Sequence[nn.Module]): The teacher or teachers (as loaded; the fit must get the same
                weights).
            dataloader: Yields batches carrying example indices (an :class:`.IndexedDataset`, or ``index_key``).
            device (str, optional): Composer device name (``'cpu'``, ``'gpu'``). Default: the GPU if there is one.
            precision (str | Precision, optional): As the trainer's. Default: ``'fp32'``.
            input_key (int | str | Callable, optional): As ``Distillation``'s. Default: ``None``.
            student_logits_key (int | str | Callable, optional): As ``Distillation``'s: without a
                ``teacher_logits_key``, teachers' outputs are read with it (a bare tensor output being the logits).
                Default: ``None``.
            teacher_logits_key (int | str | Callable, optional): As ``Distillation``'s. Default: ``None``.

        Returns:
            TeacherCache: ``self``.

        Example:
            .. testcode::

                import torch
                from torch.utils.data import DataLoader, TensorDataset
                from composer_kd import IndexedDataset, TeacherCache

                data = IndexedDataset(TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long)))
                cache = TeacherCache().precompute(torch.nn.Linear(4, 3), DataLoader(data, batch_size=4), device='cpu')
                assert cache.n_recorded == 10
        """
        teacher_list = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
        dataset = getattr(dataloader, 'dataset', None)
        if dataset is None or not hasattr(dataset, '__len__'):
            raise ValueError('precompute needs a DataLoader over a map-style dataset.')
        if self.index_key is None and not isinstance(dataset, IndexedDataset):
            raise ValueError(
                "precompute needs the examples' indices: wrap the dataset in IndexedDataset, or set index_key."
            )
        self._refuse_augmentation(dataset, (), None)
        composer_device = get_device(device)
        precision = Precision(precision)
        logits_key, bare_tensor_is_logits = resolve_teacher_logits_key(student_logits_key, teacher_logits_key)
        self._bind_to(teacher_list, dataset, precision=precision, input_key=input_key, logits_key=logits_key)
        frozen = FrozenTeachers(teacher_list)
        frozen.freeze()
        try:
            for teacher in teacher_list:
                composer_device.module_to_device(teacher)
            for batch in dataloader:
                if self.index_key is None:
                    batch, rows = detach_index(batch, dataset.key)
                else:
                    rows = read_index(batch, self.index_key)
                if self.contains(rows):
                    continue
                batch = composer_device.batch_to_device(batch)
                logits = teacher_logits(
                    teacher_list,
                    batch,
                    input_key=input_key,
                    logits_key=logits_key,
                    bare_tensor_is_logits=bare_tensor_is_logits,
                    precision=precision,
                )
                self.record(rows, logits)
        finally:
            frozen.restore()
        self.exchange(composer_device.tensor_to_device)
        self.flush()
        return self
