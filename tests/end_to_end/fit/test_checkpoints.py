"""Student checkpoints written during distillation: no teacher inside, no larger, and they resume distillation
bitwise as the uninterrupted run, from an epoch end or from the middle of an epoch (a preempted job)."""

from __future__ import annotations

import os

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from conftest import Preempt, Preempted, make_dataloader, make_student, make_teacher
from torch import nn

from composer_kd import Distillation, LinearSchedule


def big_teacher() -> nn.Module:
    # Large next to the student (~70k parameters against 28), so any leak would show in the file size.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def train(
    folder,
    algorithms,
    max_duration='1ep',
    load_path=None,
    loggers=(),
    save_interval='1ep',
    save_filename='ep{epoch}.pt',
    callbacks=(),
) -> Trainer:
    """A deterministic CPU fit of 4 batches per epoch, with checkpoints in ``folder``."""
    trainer = Trainer(
        model=make_student(),
        train_dataloader=make_dataloader(),
        max_duration=max_duration,
        algorithms=algorithms,
        save_folder=str(folder),
        save_filename=save_filename,
        save_interval=save_interval,
        load_path=load_path,
        loggers=list(loggers),
        callbacks=list(callbacks),
        progress_bar=False,
        device='cpu',
        seed=5,
        deterministic_mode=True,
    )
    trainer.fit()
    trainer.close()
    return trainer


def test_checkpoint_holds_no_teacher_and_is_no_larger(tmp_path):
    train(tmp_path / 'plain', [])
    train(tmp_path / 'kd', [Distillation(big_teacher())])
    plain_path, kd_path = tmp_path / 'plain' / 'ep1.pt', tmp_path / 'kd' / 'ep1.pt'
    plain = torch.load(plain_path, weights_only=False)
    kd = torch.load(kd_path, weights_only=False)
    assert kd['state']['model'].keys() == plain['state']['model'].keys()
    assert sum(t.numel() for t in tensors_in(kd)) == sum(t.numel() for t in tensors_in(plain))
    # The only addition is the algorithm's short description (a few hundred bytes); the teacher alone would
    # add ~280 kB.
    assert os.path.getsize(kd_path) - os.path.getsize(plain_path) < 1024
    (name, algorithm_state), *_ = kd['state']['algorithms']
    assert name == 'Distillation' and set(algorithm_state) == {'repr'}


def test_resume_continues_distillation_and_matches_an_uninterrupted_run(tmp_path):
    full = train(tmp_path / 'full', [Distillation(make_teacher())], max_duration='2ep')
    train(tmp_path / 'first', [Distillation(make_teacher())], max_duration='1ep')

    teacher = make_teacher()
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    logger = InMemoryLogger()
    resumed = train(
        tmp_path / 'second',
        [Distillation(teacher)],
        max_duration='2ep',
        load_path=str(tmp_path / 'first' / 'ep1.pt'),
        loggers=[logger],
    )
    assert len(calls) == 4  # only the second epoch's batches ran, each with the teacher
    assert len(logger.data['loss/train/kd']) == 4
    for name, value in full.state.model.state_dict().items():
        torch.testing.assert_close(resumed.state.model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize('sampled', [1, 2])
def test_resume_with_teacher_sampling_draws_as_uninterrupted(tmp_path, sampled):
    def teachers():
        return [make_teacher(seed=s) for s in (1, 2, 3)]

    full = train(tmp_path / 'full', [Distillation(teachers(), n_teachers_to_sample=sampled)], max_duration='2ep')
    train(tmp_path / 'first', [Distillation(teachers(), n_teachers_to_sample=sampled)], max_duration='1ep')
    resumed = train(
        tmp_path / 'second',
        [Distillation(teachers(), n_teachers_to_sample=sampled)],
        max_duration='2ep',
        load_path=str(tmp_path / 'first' / 'ep1.pt'),
    )
    for name, value in full.state.model.state_dict().items():
        torch.testing.assert_close(resumed.state.model.state_dict()[name], value, rtol=0, atol=0)


def preempted_then_resumed(folder, make_algorithms, batch: int, loggers=()) -> Trainer:
    """A 2-epoch run checkpointed every ``batch`` batches and preempted as batch ``batch`` starts, then resumed from
    that checkpoint to 2 epochs by a new trainer (with new teachers, given again)."""
    with pytest.raises(Preempted):
        train(
            folder / 'first',
            make_algorithms(),
            '2ep',
            save_interval=f'{batch}ba',
            save_filename='ba{batch}.pt',
            callbacks=[Preempt(batch)],
        )
    return train(
        folder / 'second', make_algorithms(), '2ep', load_path=str(folder / 'first' / f'ba{batch}.pt'), loggers=loggers
    )


def three_teachers():
    return [make_teacher(seed=s) for s in (1, 2, 3)]


MID_EPOCH_CASES = {
    'plain': lambda: [Distillation(make_teacher())],
    'teacher-sampling': lambda: [Distillation(three_teachers(), n_teachers_to_sample=2)],
    # Distils in batches 2, 3 and 4 of 8; the run resumes inside the window.
    'window': lambda: [Distillation(make_teacher(), start='2ba', end='5ba')],
    # Fractions of the 8 batches: the window is batches 1 to 6, the weight falls to 0 by batch 4 and the temperature
    # falls from 4 to 1 between batches 2 and 6.
    'fractional-schedules': lambda: [
        Distillation(
            make_teacher(),
            kd_loss_weight=LinearSchedule(1.0, 0.0, end='0.5dur'),
            temperature=LinearSchedule(4.0, 1.0, start='0.25dur', end='0.75dur'),
            start='0.125dur',
            end='0.875dur',
        )
    ],
}


@pytest.mark.parametrize('case', sorted(MID_EPOCH_CASES))
def test_a_run_preempted_mid_epoch_resumes_bitwise_as_uninterrupted(tmp_path, case):
    full_log, resumed_log = InMemoryLogger(), InMemoryLogger()
    full = train(tmp_path / 'full', MID_EPOCH_CASES[case](), '2ep', loggers=[full_log])
    # Batch 3 of 8 is the last of epoch 1's 4: the checkpoint is in the middle of the epoch.
    resumed = preempted_then_resumed(tmp_path, MID_EPOCH_CASES[case], batch=3, loggers=[resumed_log])
    assert int(resumed.state.timestamp.batch) == 8
    for name, value in full.state.model.state_dict().items():
        torch.testing.assert_close(resumed.state.model.state_dict()[name], value, rtol=0, atol=0)
    # Every logged loss term, weight and temperature of batches 3 to 7, bitwise.
    keys = [key for key in full_log.data if key.startswith(('loss/train/', 'distillation/'))]
    assert 'loss/train/total' in keys
    for key in keys:
        full_values = [float(v) for t, v in full_log.data[key] if int(t.batch) >= 3]
        assert [float(v) for _, v in resumed_log.data[key]] == full_values, key
