"""Mistakes a new user makes get a message naming the argument, path, teacher or shape, before any weight changes;
nothing the user gave (a checkpoint file, a teacher, a student) is changed."""

from __future__ import annotations

import hashlib
import inspect

import pytest
import torch
from composer import Trainer
from composer.models import ComposerClassifier
from conftest import AfterLossRecorder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_kd import Distillation, JensenShannonDivergence

N_IN, N_CLASSES = 20, 4


def loader(n: int = 16, batch_size: int = 8, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, N_IN, generator=generator), torch.randint(0, N_CLASSES, (n,), generator=generator)
    )
    return DataLoader(data, batch_size=batch_size, drop_last=drop_last)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def fit_refused(
    teacher: nn.Module, match: str, error=ValueError, train_dataloader=None, teacher_list=False, **kwargs
) -> None:
    """A one-epoch fit that must be refused with ``match``; the student and the teacher stay as they were."""
    torch.manual_seed(1)
    student = ComposerClassifier(nn.Linear(N_IN, N_CLASSES), num_classes=N_CLASSES)
    student_before = snapshot(student)
    teacher_before = None if any(p.is_meta for p in teacher.parameters()) else snapshot(teacher)
    trainer = Trainer(
        model=student,
        train_dataloader=train_dataloader if train_dataloader is not None else loader(),
        max_duration='1ep',
        algorithms=[Distillation(list(teacher) if teacher_list else teacher, **kwargs)],
        progress_bar=False,
        device='cpu',
    )
    with pytest.raises(error, match=match):
        trainer.fit()
    assert_unchanged(student, student_before)
    if teacher_before is not None:
        assert_unchanged(teacher, teacher_before)


def digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_text_file_as_checkpoint_is_named(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text('not a checkpoint\n')
    before = digest(path)
    teacher = nn.Linear(N_IN, N_CLASSES)
    weights = snapshot(teacher)
    with pytest.raises(ValueError, match=r"'.*notes\.txt' could not be read \(truncated or not a PyTorch checkpoint\)"):
        Distillation({str(path): teacher})
    assert digest(path) == before
    assert_unchanged(teacher, weights)


def test_a_directory_as_checkpoint_is_named_as_given(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=f"'{folder}' is a directory; give the checkpoint file inside it"):
        Distillation({str(folder): nn.Linear(N_IN, N_CLASSES)})


def test_a_float64_teacher_is_refused_at_fit_start():
    fit_refused(
        nn.Linear(N_IN, N_CLASSES).double(),
        r"teachers\[0\] \(Linear\) has float64 parameters \(e.g. 'weight'\).*teacher\.float\(\)",
    )


def test_a_teacher_without_weights_on_the_meta_device_is_refused_at_fit_start():
    with torch.device('meta'):
        teacher = nn.Linear(N_IN, N_CLASSES)
    fit_refused(teacher, r"teachers\[0\] \(Linear\) has tensors on the meta device \(e.g. 'weight'\).*load_state_dict")


def test_a_teacher_that_cannot_take_the_batch_is_named_with_its_input():
    fit_refused(
        nn.Linear(12, N_CLASSES),
        r'teachers\[0\] \(Linear\) failed on the batch it was given, \(Tensor\[8, 20\] float32, Tensor\[8\] int64\), '
        r'with input_key=None .*mat1 and mat2 shapes cannot be multiplied.*choose it with input_key=',
        error=RuntimeError,
    )


def test_the_failing_teacher_is_named_by_its_index_among_several():
    teachers = nn.ModuleList([nn.Linear(N_IN, N_CLASSES), nn.Linear(7, N_CLASSES)])
    fit_refused(teachers, r'teachers\[1\] \(Linear\) failed on the batch', error=RuntimeError, teacher_list=True)


class FeaturesAndLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(N_IN, 32), nn.Linear(32, N_CLASSES)

    def forward(self, x):
        features = self.body(x)
        return features, self.head(features)


def test_a_tuple_output_whose_first_element_is_not_the_logits_points_to_teacher_logits_key():
    fit_refused(
        FeaturesAndLogits(),
        r'teachers\[0\] returned a tuple of 2 elements whose first, taken as its logits, has shape \(8, 32\), while '
        r"the student's logits have shape \(8, 4\).*teacher_logits_key=",
    )


def test_with_teacher_logits_key_the_tuple_output_trains():
    torch.manual_seed(1)
    teacher = FeaturesAndLogits()
    student = ComposerClassifier(nn.Linear(N_IN, N_CLASSES), num_classes=N_CLASSES)
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    recorder = AfterLossRecorder()
    Trainer(
        model=student,
        train_dataloader=loader(),
        max_duration='1ep',
        algorithms=[Distillation(teacher, teacher_logits_key=1)],
        callbacks=[recorder],
        progress_bar=False,
        device='cpu',
    ).fit()
    # The distillation term is taken against the tuple's second element, the head's logits, at every step
    # (KLDivergence at its default temperature, 4, written out in float64).
    assert len(recorder.steps) == 2
    for step in recorder.steps:
        with torch.no_grad():
            _, teacher_logits = teacher(step['inputs'])
        p = torch.softmax(teacher_logits.double() / 4.0, dim=-1)
        q = torch.softmax(step['logits'].double() / 4.0, dim=-1)
        expected = 4.0**2 * (p * (p.log() - q.log())).sum(-1).mean()
        assert step['loss']['kd'].item() == pytest.approx(expected.item(), rel=1e-5)
    # The student trained; the teacher is as it was given.
    assert any(not torch.equal(student.state_dict()[key], value) for key, value in student_before.items())
    assert_unchanged(teacher, teacher_before)


def test_an_empty_training_dataloader_is_refused_instead_of_spinning():
    fit_refused(
        nn.Linear(N_IN, N_CLASSES),
        r'The training dataloader is empty \(0 batches\)',
        train_dataloader=loader(n=3, batch_size=8, drop_last=True),
    )


def test_a_misspelled_argument_gets_the_nearest_one():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'temprature'; did you mean 'temperature'\?"):
        Distillation(nn.Linear(N_IN, N_CLASSES), temprature=2.0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'$"):
        Distillation(nn.Linear(N_IN, N_CLASSES), zzz=2.0)
    # Introspection still shows the constructor's own parameters.
    assert list(inspect.signature(Distillation).parameters)[:3] == ['teachers', 'kd_loss_fn', 'org_loss_weight']


def test_a_loss_name_is_accepted_and_an_unknown_one_lists_the_known():
    distillation = Distillation(nn.Linear(N_IN, N_CLASSES), kd_loss_fn='js', temperature=2.0)
    assert isinstance(distillation.kd_loss_fn, JensenShannonDivergence)
    with pytest.raises(ValueError, match=r"Unknown loss 'kll'; known: \['cosine', .*'js', 'kl'"):
        Distillation(nn.Linear(N_IN, N_CLASSES), kd_loss_fn='kll')
    with pytest.raises(TypeError, match=r"kd_loss_fn must be a loss name \(one of \['cosine'.*or a callable"):
        Distillation(nn.Linear(N_IN, N_CLASSES), kd_loss_fn=3)


def test_distillation_still_copies_and_pickles():
    import copy
    import pickle

    distillation = Distillation(nn.Linear(N_IN, N_CLASSES), kd_loss_fn='kl')
    assert isinstance(copy.deepcopy(distillation), Distillation)
    assert isinstance(pickle.loads(pickle.dumps(distillation)), Distillation)
