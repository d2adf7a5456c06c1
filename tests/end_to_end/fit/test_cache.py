"""TeacherCache: recorded outputs are the teacher's, later epochs skip it, stale or augmented data are refused,
top-k follows its formula, and runs with a cache (resumed or not) train the student as runs without one."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from composer import Algorithm, Callback, Event, Trainer
from composer.algorithms import LabelSmoothing, MixUp
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from composer.utils import dist
from conftest import DOCS, N_CLASSES, N_FEATURES, AfterLossRecorder, make_student, make_teacher
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from composer_kd import (
    Distillation,
    FeaturePair,
    IndexedDataset,
    KLDivergence,
    StaleTeacherCacheError,
    TeacherCache,
    indexed_collate,
    topk_compress,
    topk_logits,
)
from composer_kd.cache import IndexedSample, attach_index, detach_index, find_augmentation

DOC = DOCS / 'caching.md'
N_EXAMPLES, BATCH, MICROBATCH = 40, 8, 3


def make_data(n: int = N_EXAMPLES, seed: int = 7) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, N_FEATURES, generator=generator), torch.randint(0, N_CLASSES, (n,), generator=generator)
    )


def make_loader(dataset: Dataset, shuffle: bool = True) -> DataLoader:
    # A DistributedSampler's order depends only on (seed, epoch): identical in every run and after a resume.
    return DataLoader(dataset, batch_size=BATCH, sampler=dist.get_sampler(dataset, shuffle=shuffle, seed=3))


class TeacherCalls:
    """Counts a teacher's forward passes by epoch, and keeps each call's input and output."""

    def __init__(self, teacher: nn.Module):
        self.state = None
        self.epochs: list[int] = []
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        teacher.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.epochs.append(int(self.state.timestamp.epoch) if self.state is not None else -1)
        self.calls.append((inputs[0].detach().clone(), output.detach().clone()))


def fit(
    algorithms,
    dataset=None,
    max_duration='3ep',
    microbatch=MICROBATCH,
    calls: TeacherCalls | None = None,
    model: nn.Module | None = None,
    auto_microbatching: bool = False,
    **kwargs,
) -> Trainer:
    trainer = Trainer(
        model=model if model is not None else make_student(),
        train_dataloader=make_loader(dataset if dataset is not None else IndexedDataset(make_data())),
        max_duration=max_duration,
        algorithms=algorithms,
        device_train_microbatch_size=microbatch,
        progress_bar=False,
        device='cpu',
        seed=5,
        deterministic_mode=True,
        **kwargs,
    )
    if calls is not None:
        calls.state = trainer.state
    # Composer accepts device_train_microbatch_size='auto' on a GPU only; its retry loop itself runs on any device.
    trainer.state.auto_microbatching = auto_microbatching
    trainer.fit()
    trainer.close()
    return trainer


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, rtol=0, atol=atol)


# ---- indices ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'sample',
    [(torch.ones(2), torch.tensor(1)), [torch.ones(2), 3], {'input_ids': torch.ones(2)}, torch.ones(2)],
    ids=['tuple', 'list', 'dict', 'tensor'],
)
def test_attach_then_detach_gives_the_batch_back(sample):
    samples = [sample, sample]
    plain = torch.utils.data.default_collate(samples)
    indexed = torch.utils.data.default_collate([attach_index(sample, i) for i in (4, 9)])
    batch, index = detach_index(indexed)
    assert index.tolist() == [4, 9]
    assert type(batch) is type(plain) or (isinstance(plain, list) and isinstance(batch, list))
    torch.testing.assert_close(batch, plain, rtol=0, atol=0)


def test_indexed_collate_keeps_the_index_away_from_a_custom_collate():
    seen = []

    def pad(samples):  # a padding collator that would choke on an unexpected key
        seen.extend(sorted(s) for s in samples)
        length = max(len(s['ids']) for s in samples)
        return {'ids': torch.stack([torch.nn.functional.pad(s['ids'], (0, length - len(s['ids']))) for s in samples])}

    data = IndexedDataset([{'ids': torch.tensor([1, 2, 3])}, {'ids': torch.tensor([4])}])
    batch = next(iter(DataLoader(data, batch_size=2, collate_fn=indexed_collate(pad))))
    assert seen == [['ids'], ['ids']]
    assert batch['index'].tolist() == [0, 1] and batch['ids'].tolist() == [[1, 2, 3], [4, 0, 0]]
    tensors = IndexedDataset([torch.zeros(2), torch.ones(2)])
    stacked = indexed_collate(lambda s: torch.stack(s))([tensors[1], tensors[0]])
    assert isinstance(stacked, IndexedSample) and stacked.index.tolist() == [1, 0]


def test_a_batch_without_indices_is_refused_with_a_hint():
    with pytest.raises(ValueError, match='IndexedDataset'):
        fit([Distillation(make_teacher(), teacher_cache=TeacherCache())], dataset=make_data(), max_duration='1ba')
    with pytest.raises(ValueError, match='1-D integer tensor'):
        detach_index([torch.zeros(2, 3), torch.zeros(2)])


class DictStudent(ComposerModel):
    """A student reading a dict batch that carries its own example index under 'idx'."""

    def __init__(self):
        super().__init__()
        self.module = make_student().module

    def forward(self, batch):
        return self.module(batch['x'])

    def loss(self, outputs, batch):
        return nn.functional.cross_entropy(outputs, batch['y'])


class DictData(Dataset):
    def __init__(self, data: TensorDataset):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {'x': x, 'y': y, 'idx': i}


def test_index_key_reads_indices_the_batch_already_has():
    teacher = make_teacher()
    calls = TeacherCalls(teacher)
    cache = TeacherCache(index_key='idx')
    trainer = Trainer(
        model=DictStudent(),
        train_dataloader=make_loader(DictData(make_data())),
        max_duration='2ep',
        algorithms=[Distillation(teacher, input_key='x', teacher_cache=cache)],
        device_train_microbatch_size=MICROBATCH,
        progress_bar=False,
        device='cpu',
    )
    calls.state = trainer.state
    trainer.fit()
    assert set(calls.epochs) == {0} and cache.n_recorded == N_EXAMPLES
    x = make_data().tensors[0]
    torch.testing.assert_close(cache.lookup(torch.arange(N_EXAMPLES)), teacher(x).detach(), rtol=1e-6, atol=1e-6)


# ---- recorded outputs ---------------------------------------------------------------------------------------


def rows_of(inputs: torch.Tensor, data: TensorDataset) -> torch.Tensor:
    """The dataset index of each input row, found by exact comparison with every example."""
    matches = (inputs[:, None, :] == data.tensors[0][None, :, :]).all(dim=-1)
    assert (matches.sum(dim=1) == 1).all()
    return matches.float().argmax(dim=1)


def test_cached_logits_are_bitwise_what_the_teacher_gave_and_later_epochs_skip_it():
    teacher = make_teacher()
    calls = TeacherCalls(teacher)
    cache = TeacherCache()
    fit([Distillation(teacher, teacher_cache=cache)], calls=calls)
    # Epoch 0 only: 5 shuffled batches of 8, each split into microbatches of 3, 3 and 2.
    assert calls.epochs == [0] * 15
    assert sorted(len(x) for x, _ in calls.calls) == [2] * 5 + [3] * 10
    assert cache.n_recorded == N_EXAMPLES
    data = make_data()
    seen = torch.cat([rows_of(x, data) for x, _ in calls.calls])
    assert sorted(seen.tolist()) == list(range(N_EXAMPLES))
    for inputs, outputs in calls.calls:
        assert torch.equal(cache.lookup(rows_of(inputs, data)), outputs)


def test_several_teachers_are_cached_as_their_average():
    teachers = [make_teacher(seed=1), make_teacher(seed=2)]
    cache = TeacherCache()
    fit([Distillation(teachers, teacher_cache=cache)], max_duration='1ep')
    x = make_data().tensors[0]
    expected = (teachers[0](x) + teachers[1](x)).detach() / 2
    torch.testing.assert_close(cache.lookup(torch.arange(N_EXAMPLES)), expected, rtol=1e-6, atol=1e-6)


def test_training_with_a_cache_matches_training_without():
    logs = InMemoryLogger(), InMemoryLogger()
    plain = fit([Distillation(make_teacher(), KLDivergence(2.0), 0.5, 0.5)], dataset=make_data(), loggers=[logs[0]])
    cached = fit(
        [Distillation(make_teacher(), KLDivergence(2.0), 0.5, 0.5, teacher_cache=TeacherCache())], loggers=[logs[1]]
    )
    assert_same_weights(plain.state.model, cached.state.model, atol=1e-6)
    kd = [torch.tensor([v for _, v in log.data['loss/train/kd']]) for log in logs]
    assert len(kd[0]) == 15
    torch.testing.assert_close(kd[1], kd[0], rtol=1e-6, atol=1e-7)


class OutOfMemoryOnce(Callback):
    """Raises, once, the error Composer takes for CUDA running out of memory: in the second microbatch of the first
    batch, after the cache gave that microbatch its rows (the loss is computed), before its backward pass."""

    def __init__(self):
        self.microbatches = 0

    def before_backward(self, state, logger):
        self.microbatches += 1
        if self.microbatches == 2:
            raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)')


def test_an_automatic_microbatching_retry_starts_again_from_the_first_row():
    retried_log, reference_log = AfterLossRecorder(), AfterLossRecorder()
    data = make_data()
    teacher = make_teacher()
    calls = TeacherCalls(teacher)
    cache = TeacherCache()
    with pytest.warns(RuntimeWarning, match='Train microbatch size will be decreased from 4 -> 2'):
        retried = fit(
            [Distillation(teacher, KLDivergence(2.0), 0.5, 0.5, teacher_cache=cache)],
            max_duration='1ep',
            microbatch=4,
            calls=calls,
            auto_microbatching=True,
            callbacks=[OutOfMemoryOnce(), retried_log],
        )
    # The first batch ran microbatches of 4 until the second failed; it was run again as 4 microbatches of 2.
    assert [len(step['inputs']) for step in retried_log.steps][:6] == [4, 4, 2, 2, 2, 2]
    # The teacher ran for the two failed microbatches; the retry read their 8 rows back from the first one on.
    assert [len(x) for x, _ in calls.calls][:3] == [4, 4, 2]
    assert cache.n_recorded == N_EXAMPLES
    # The reference: microbatches of 2 from the start, no cache.
    reference = fit(
        [Distillation(make_teacher(), KLDivergence(2.0), 0.5, 0.5)],
        dataset=data,
        max_duration='1ep',
        microbatch=2,
        callbacks=[reference_log],
    )
    retried_steps = retried_log.steps[2:]
    assert len(retried_steps) == len(reference_log.steps) == 20
    for got, expected in zip(retried_steps, reference_log.steps, strict=True):
        assert torch.equal(got['inputs'], expected['inputs'])
        # A retry that did not restart at the first row would pair each microbatch with other examples' logits.
        # 1e-6, not bitwise: the retried batch reads logits the teacher gave on microbatches of 4, not 2.
        torch.testing.assert_close(got['loss']['kd'], expected['loss']['kd'], rtol=0, atol=1e-6)
    assert_same_weights(reference.state.model, retried.state.model, atol=1e-6)


def test_refused_combinations_are_named():
    teachers = [make_teacher(seed=1), make_teacher(seed=2)]
    with pytest.raises(ValueError, match='n_teachers_to_sample'):
        Distillation(teachers, n_teachers_to_sample=1, teacher_cache=TeacherCache())
    with pytest.raises(ValueError, match='feature_pairs'):
        Distillation(teachers[0], feature_pairs=[FeaturePair('module', '0')], teacher_cache=TeacherCache())
    with pytest.raises(TypeError, match='TeacherCache'):
        Distillation(teachers[0], teacher_cache='memory')
    with pytest.raises(ValueError, match='top_k'):
        TeacherCache(top_k=0)


class PoisonedTeacher(nn.Module):
    """NaN logits for examples whose first feature exceeds 1."""

    def __init__(self):
        super().__init__()
        self.inner = make_teacher()

    def forward(self, x):
        out = self.inner(x)
        return torch.where((x[:, :1] > 1.0), torch.full_like(out, float('nan')), out)


def test_nonfinite_outputs_are_checked_and_never_recorded():
    data = make_data()
    poisoned = int((data.tensors[0][:, 0] > 1.0).sum())
    assert 0 < poisoned < N_EXAMPLES
    cache = TeacherCache()
    teacher = PoisonedTeacher()
    calls = TeacherCalls(teacher)
    fit([Distillation(teacher, on_nonfinite_teacher='skip', teacher_cache=cache)], max_duration='2ep', calls=calls)
    assert cache.n_recorded == N_EXAMPLES - poisoned
    assert not cache.contains(torch.nonzero(data.tensors[0][:, 0] > 1.0).flatten()[:1])
    # The second epoch runs the teacher again only on microbatches holding a poisoned example.
    assert 0 < calls.epochs.count(1) < calls.epochs.count(0)
    with pytest.raises(FloatingPointError, match='NaN'):
        fit([Distillation(PoisonedTeacher(), teacher_cache=TeacherCache())], max_duration='1ep')


def test_float16_storage_refuses_logits_beyond_its_range():
    cache = TeacherCache(dtype=torch.float16)
    cache.bind({'x': 1}, n_rows=2)
    with pytest.raises(ValueError, match='beyond the range'):
        cache.record(torch.tensor([0, 1]), torch.tensor([[1.0, 7e4], [0.0, 1.0]]))


def test_an_index_outside_the_dataset_is_named():
    cache = TeacherCache()
    cache.bind({'x': 1}, n_rows=4)
    with pytest.raises(IndexError, match='Example index 7 is outside the training dataset of 4 examples'):
        cache.record(torch.tensor([0, 7]), torch.zeros(2, 3))


# ---- top-k --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('tail', ['uniform', 'drop'])
def test_topk_reconstruction_follows_the_documented_formula(tail):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=generator) * 3
    k, vocab = 4, 11
    values, indices, rest = topk_compress(logits, k)
    probs = topk_logits(values, indices, vocab, rest if tail == 'uniform' else None).softmax(dim=-1).double()
    z = logits.double().numpy()
    for position in np.ndindex(z.shape[:-1]):
        row = z[position]
        top = np.argsort(-row)[:k]
        others = np.setdiff1d(np.arange(vocab), top)
        total = np.exp(row).sum()
        expected = np.zeros(vocab)
        if tail == 'uniform':
            # Kept classes exactly; the others share the teacher's remaining mass evenly.
            expected[top] = np.exp(row[top]) / total
            expected[others] = np.exp(row[others]).sum() / total / (vocab - k)
        else:
            # The kept classes renormalized; the others impossible.
            expected[top] = np.exp(row[top]) / np.exp(row[top]).sum()
        np.testing.assert_allclose(probs[position].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_topk_cache_trains_on_the_rebuilt_logits():
    cache = TeacherCache(top_k=2)
    teacher = make_teacher()
    fit([Distillation(teacher, teacher_cache=cache)], max_duration='1ep')
    x = make_data().tensors[0]
    values, indices, rest = topk_compress(teacher(x).detach(), 2)
    torch.testing.assert_close(cache.lookup(torch.arange(N_EXAMPLES)), topk_logits(values, indices, N_CLASSES, rest))
    with pytest.raises(ValueError, match='smaller than the number of classes'):
        fit([Distillation(make_teacher(), teacher_cache=TeacherCache(top_k=N_CLASSES))], max_duration='1ba')


# ---- disk, fingerprint --------------------------------------------------------------------------------------


def test_disk_cache_round_trip_through_memory_mapped_files(tmp_path):
    teacher = make_teacher()
    fit([Distillation(teacher, teacher_cache=TeacherCache(tmp_path / 'c'))], max_duration='1ep')
    x = make_data().tensors[0]
    # The files are plain .npy arrays anyone can read.
    assert np.load(tmp_path / 'c' / 'filled.npy').all()
    recorded = np.load(tmp_path / 'c' / 'values.npy')
    # (Bitwise equal to the teacher's output on each microbatch; recomputing on the whole set differs in ulps.)
    np.testing.assert_allclose(recorded, teacher(x).detach().numpy(), rtol=1e-6, atol=1e-7)
    # A new run, a new cache object on the same folder: every output is read back, the teacher never runs.
    calls = TeacherCalls(teacher)
    reopened = TeacherCache(tmp_path / 'c')
    fit([Distillation(teacher, teacher_cache=reopened)], max_duration='2ep', calls=calls)
    assert calls.epochs == [] and reopened.n_recorded == N_EXAMPLES
    assert torch.equal(reopened.lookup(torch.arange(N_EXAMPLES)), torch.from_numpy(recorded))


def test_disk_cache_in_bfloat16_and_top_k(tmp_path):
    teacher = make_teacher()
    cache = TeacherCache(tmp_path, top_k=2, dtype=torch.bfloat16)
    cache.precompute(teacher, DataLoader(IndexedDataset(make_data()), batch_size=16), device='cpu')
    logits = teacher(make_data().tensors[0]).detach()
    values, indices, rest = topk_compress(logits, 2)
    stored = torch.from_numpy(np.load(tmp_path / 'values.npy')).view(torch.bfloat16)
    assert torch.equal(stored, values.to(torch.bfloat16))
    assert torch.equal(torch.from_numpy(np.load(tmp_path / 'indices.npy')).long(), indices)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / 'tail.npy')), rest, rtol=0, atol=0)
    # Precomputed outputs serve a fit: its teacher never runs.
    calls = TeacherCalls(teacher)
    fit([Distillation(teacher, teacher_cache=TeacherCache(tmp_path, top_k=2, dtype=torch.bfloat16))], calls=calls)
    assert calls.epochs == []


def test_a_stale_cache_is_refused_naming_the_path_and_what_differs(tmp_path):
    folder = tmp_path / 'cache'
    fit([Distillation(make_teacher(), teacher_cache=TeacherCache(folder))], max_duration='1ep')

    student = make_student()
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    changed = make_teacher()
    with torch.no_grad():
        changed[0].weight[0, 0] += 1e-3
    with pytest.raises(StaleTeacherCacheError) as error:
        fit([Distillation(changed, teacher_cache=TeacherCache(folder))], model=student)
    message = str(error.value)
    assert repr(str(folder)) in message and 'teachers: recorded' in message and 'dataset_length' not in message

    with pytest.raises(StaleTeacherCacheError, match=r'dataset_length: recorded 40, now 39') as error:
        fit([Distillation(make_teacher(), teacher_cache=TeacherCache(folder))], dataset=IndexedDataset(make_data(39)))
    assert repr(str(folder)) in str(error.value)
    with pytest.raises(StaleTeacherCacheError, match='top_k: recorded None, now 2'):
        fit([Distillation(make_teacher(), teacher_cache=TeacherCache(folder, top_k=2))])
    # Refused before training: the student was not touched.
    for name, value in student.state_dict().items():
        assert torch.equal(value, student_before[name])

    # An in-memory cache, reused with a teacher whose weights changed, is refused the same way.
    cache = TeacherCache()
    teacher = make_teacher()
    fit([Distillation(teacher, teacher_cache=cache)], max_duration='1ep')
    with torch.no_grad():
        teacher[0].bias.zero_()
    with pytest.raises(StaleTeacherCacheError, match='in-memory teacher cache'):
        fit([Distillation(teacher, teacher_cache=cache)], max_duration='1ep')


# ---- augmentation -------------------------------------------------------------------------------------------


class TransformedData(Dataset):
    """Examples passed through ``transform``, as torchvision datasets do."""

    def __init__(self, transform):
        self.data = make_data()
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return self.transform(x), y


def test_random_transforms_are_refused_by_name_unless_allowed():
    flip = T.Compose([T.Lambda(lambda x: x), T.RandomApply([T.Lambda(lambda x: -x)], p=0.5)])
    data = IndexedDataset(TransformedData(flip))
    with pytest.raises(ValueError, match=re.escape('RandomApply (at train_dataloader.dataset.dataset.transform')):
        fit([Distillation(make_teacher(), teacher_cache=TeacherCache())], dataset=data, max_duration='1ba')
    cache = TeacherCache(allow_augmentation=True)
    fit([Distillation(make_teacher(), teacher_cache=cache)], dataset=data, max_duration='1ep')
    assert cache.n_recorded == N_EXAMPLES
    # A deterministic transform is no augmentation.
    assert find_augmentation(IndexedDataset(TransformedData(T.Compose([T.Lambda(lambda x: 2 * x)])))) is None


class AddNoise(Algorithm):
    """An algorithm unknown to the cache, found by the event it matches."""

    def match(self, event, state):
        return event == Event.BEFORE_FORWARD

    def apply(self, event, state, logger):
        pass


def test_algorithms_that_change_inputs_are_refused_and_label_smoothing_is_not():
    with pytest.raises(ValueError, match='Composer algorithm MixUp'):
        fit([Distillation(make_teacher(), teacher_cache=TeacherCache()), MixUp()], max_duration='1ba')

    with pytest.raises(ValueError, match='Composer algorithm AddNoise'):
        fit([Distillation(make_teacher(), teacher_cache=TeacherCache()), AddNoise()], max_duration='1ba')
    cache = TeacherCache()
    fit([Distillation(make_teacher(), teacher_cache=cache), LabelSmoothing(0.1)], max_duration='1ep')
    assert cache.n_recorded == N_EXAMPLES


# ---- exact resume -------------------------------------------------------------------------------------------


def checkpointed_fit(folder, algorithms, max_duration, interval, load_path=None, logger=None, calls=None) -> Trainer:
    return fit(
        algorithms,
        max_duration=max_duration,
        calls=calls,
        save_folder=str(folder),
        save_filename='ba{batch}.pt',
        save_interval=interval,
        load_path=load_path,
        loggers=[logger] if logger is not None else [],
    )


@pytest.mark.parametrize('where', ['memory', 'disk'])
@pytest.mark.parametrize('stop', ['ba3', 'ba5'], ids=['mid-epoch', 'epoch-end'])
def test_resume_gives_the_uninterrupted_trajectory(tmp_path, where, stop):
    def cache(run: str) -> TeacherCache:
        return TeacherCache(None if where == 'memory' else tmp_path / f'cache-{run}')

    def distillation(run: str) -> Distillation:
        return Distillation(make_teacher(), KLDivergence(2.0), 0.5, 0.5, teacher_cache=cache(run))

    full_log, resumed_log = InMemoryLogger(), InMemoryLogger()
    full = checkpointed_fit(tmp_path / 'full', [distillation('full')], '2ep', '1ep', logger=full_log)
    interval = '3ba' if stop == 'ba3' else '1ep'
    checkpointed_fit(tmp_path / 'first', [distillation('first')], stop.replace('ba', '') + 'ba', interval)
    teacher = make_teacher()
    calls = TeacherCalls(teacher)
    resumed = checkpointed_fit(
        tmp_path / 'second',
        [Distillation(teacher, KLDivergence(2.0), 0.5, 0.5, teacher_cache=cache('first'))],
        '2ep',
        '1ep',
        load_path=str(tmp_path / 'first' / f'{stop}.pt'),
        logger=resumed_log,
        calls=calls,
    )
    # Only the first epoch's unseen batches ran the teacher: 2 batches of 3 microbatches mid-epoch, none after.
    assert calls.epochs == ([0] * 6 if stop == 'ba3' else [])
    assert_same_weights(full.state.model, resumed.state.model)
    full_kd = [float(v) for _, v in full_log.data['loss/train/kd']]
    resumed_kd = [float(v) for _, v in resumed_log.data['loss/train/kd']]
    assert resumed_kd == full_kd[-len(resumed_kd) :] and len(resumed_kd) == 10 - int(stop[2:])


def test_a_checkpoint_cache_from_another_teacher_is_refused(tmp_path):
    checkpointed_fit(tmp_path / 'a', [Distillation(make_teacher(), teacher_cache=TeacherCache())], '1ep', '1ep')
    cache = TeacherCache()
    with pytest.raises(StaleTeacherCacheError, match='saved in the checkpoint'):
        checkpointed_fit(
            tmp_path / 'b',
            [Distillation(make_teacher(seed=9), teacher_cache=cache)],
            '2ep',
            '1ep',
            load_path=str(tmp_path / 'a' / 'ba5.pt'),
        )
    assert cache.n_recorded == 0  # the refused outputs are gone, not kept for a later fit


# ---- docs ---------------------------------------------------------------------------------------------------

BLOCKS = re.findall(r'```python\n(.*?)```', DOC.read_text(), flags=re.DOTALL) if DOC.exists() else []


def test_the_caching_page_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_caching_page_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], str(DOC), 'exec'), {'__name__': 'caching_doc'})


# ---- the example --------------------------------------------------------------------------------------------


def test_cached_distillation_example_runs_tiny(capsys):
    from conftest import load_example

    example = load_example('cached_distillation')
    argv = '--teacher-epochs 1 --student-epochs 2 --max-train-samples 96 --batch-size 32 --device cpu --compare'
    results = example.main(argv.split())
    assert results['recorded'] == results['train_samples'] == 96
    # 3 batches: the teacher runs for each in epoch 1 and never in epoch 2.
    assert results['cached_teacher_calls'] == [3, 0]
    assert results['max_weight_difference'] < 1e-5
    assert 0 <= results['cached_accuracy'] <= 1 and results['teacher_params'] > results['student_params']
    assert 'teacher ran 0 times' in capsys.readouterr().out
