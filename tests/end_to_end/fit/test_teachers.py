"""Teachers given as modules, lists and checkpoint dicts; checkpoint reading and its errors."""

from __future__ import annotations

import os

import pytest
import torch
from composer import Trainer
from composer.models import ComposerClassifier
from conftest import N_CLASSES, make_dataloader, make_teacher
from torch import nn

from composer_kd import Distillation, load_teacher_checkpoint
from composer_kd.models.teachers import align_state_dict_keys


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope='module')
def composer_checkpoint(tmp_path_factory) -> tuple[str, ComposerClassifier]:
    """A teacher trained and saved by Composer's own Trainer."""
    folder = tmp_path_factory.mktemp('teacher_run')
    teacher = ComposerClassifier(make_teacher(seed=3), num_classes=N_CLASSES)
    trainer = Trainer(
        model=teacher,
        train_dataloader=make_dataloader(),
        max_duration='1ep',
        save_folder=str(folder),
        save_filename='teacher.pt',
        progress_bar=False,
        device='cpu',
    )
    trainer.fit()
    trainer.close()
    return str(folder / 'teacher.pt'), teacher


def test_dict_teacher_loads_composer_checkpoint_into_bare_module(composer_checkpoint):
    path, trained = composer_checkpoint
    fresh = make_teacher(seed=99)  # bare nn.Sequential: the checkpoint stores it under 'module.'
    algorithm = Distillation(teachers={path: fresh})
    assert algorithm.teacher_modules == [fresh]
    assert_same_weights(fresh, trained.module)


def test_dict_teacher_loads_composer_checkpoint_into_composer_model(composer_checkpoint):
    path, trained = composer_checkpoint
    fresh = ComposerClassifier(make_teacher(seed=98), num_classes=N_CLASSES)
    Distillation(teachers={path: fresh})
    assert_same_weights(fresh.module, trained.module)


def test_checkpoint_file_is_not_modified(composer_checkpoint):
    path, _ = composer_checkpoint
    before = open(path, 'rb').read()
    Distillation(teachers={path: make_teacher(seed=97)})
    assert open(path, 'rb').read() == before


@pytest.mark.parametrize('prefix', ['', 'module.', 'model.module.'])
def test_plain_state_dict_with_wrapper_prefixes(tmp_path, prefix):
    source = make_teacher(seed=4)
    path = tmp_path / 'weights.pt'
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    target = make_teacher(seed=5)
    load_teacher_checkpoint(target, str(path))
    assert_same_weights(target, source)


def test_align_keeps_a_model_whose_own_submodule_is_called_model():
    # Like LlamaForCausalLM ('model.layers...'), saved inside Composer's HuggingFaceModel ('model.model.layers...').
    expected = ['model.layers.0.weight', 'model.norm.weight', 'lm_head.weight']
    wrapped = {'model.' + k: k for k in expected}
    assert set(align_state_dict_keys(wrapped, expected)) == set(expected)
    bare = {k: k for k in expected}
    assert set(align_state_dict_keys(bare, expected)) == set(expected)


def test_missing_checkpoint_names_the_path(tmp_path):
    path = str(tmp_path / 'nowhere' / 'teacher.pt')
    with pytest.raises(FileNotFoundError, match='nowhere/teacher.pt'):
        Distillation(teachers={path: make_teacher()})


def test_mismatched_weights_name_file_and_keys_and_leave_model_untouched(tmp_path):
    other = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))
    path = tmp_path / 'other.pt'
    torch.save(other.state_dict(), path)
    target = make_teacher(seed=6)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as excinfo:
        Distillation(teachers={str(path): target})
    message = str(excinfo.value)
    assert 'other.pt' in message
    assert "missing keys, first ['3.weight', '3.bias']" in message
    assert "4 unexpected keys, first ['2.weight', '2.bias', '4.weight', '4.bias']" in message
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shape_mismatch_is_reported_before_copying(tmp_path):
    path = tmp_path / 'wide.pt'
    torch.save(make_teacher(n_classes=N_CLASSES + 1).state_dict(), path)
    target = make_teacher(seed=8)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r'wide.pt.*3.weight: checkpoint \(5, 16\) vs model \(4, 16\)'):
        load_teacher_checkpoint(target, str(path))
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize('content', [b'', b'not a checkpoint at all'])
def test_corrupt_checkpoint_names_the_file(tmp_path, content):
    path = tmp_path / 'broken.pt'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='broken.pt.*could not be read'):
        Distillation(teachers={str(path): make_teacher()})


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / 'cut.pt'
    torch.save(make_teacher().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match='cut.pt.*could not be read'):
        Distillation(teachers={str(path): make_teacher()})


def test_checkpoint_without_weights_is_refused(tmp_path):
    path = tmp_path / 'meta.pt'
    torch.save({'epoch': 3, 'note': 'no weights here'}, path)
    with pytest.raises(ValueError, match='meta.pt.*holds no model weights'):
        Distillation(teachers={str(path): make_teacher()})


@pytest.mark.parametrize('teachers', [[], {}, ()])
def test_no_teachers_is_refused(teachers):
    with pytest.raises(ValueError, match='at least one teacher'):
        Distillation(teachers=teachers)


@pytest.mark.parametrize('teachers', [None, 'teacher.pt', [make_teacher(), 'x']])
def test_non_module_teachers_are_refused(teachers):
    with pytest.raises(TypeError, match='teachers'):
        Distillation(teachers=teachers)


def test_list_of_teachers_keeps_order():
    a, b = make_teacher(1), make_teacher(2)
    assert Distillation(teachers=[a, b]).teacher_modules == [a, b]


def test_pathlike_keys_are_accepted(tmp_path):
    source = make_teacher(seed=11)
    path = tmp_path / 'w.pt'
    torch.save(source.state_dict(), path)
    target = make_teacher(seed=12)
    Distillation(teachers={path: target})
    assert_same_weights(target, source)
    assert os.path.exists(path)
