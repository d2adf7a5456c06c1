"""A teacher with nothing to teach is named: refused by a recipe before anything trains (untrained, or a newly
initialized Hugging Face head), warned about by a run that evaluates it (chance level, below the student alone),
with the reason a distillation ratio is omitted in the summary."""

from __future__ import annotations

import hashlib
import os
import warnings

import pytest
import torch
from torch import nn

from composer_kd import distill
from composer_kd.recipes import RecipeError, build_run, load_recipe
from composer_kd.recipes.data import load_digits_splits
from composer_kd.run.reporting import WeakTeacherWarning, format_summary

TINY = ['progress_bar=false', 'max_duration=4ba', 'eval_interval=4ba', 'device=cpu']


def digest(folder) -> dict[str, str]:
    """Every file under ``folder`` and the hash of its bytes."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def test_a_teacher_neither_trained_nor_loaded_is_refused_by_key(tmp_path):
    recipe_file = tmp_path / 'recipe.yaml'
    recipe_file.write_text(
        'student: {kind: mlp, hidden: [16]}\n'
        'teachers: [{kind: cnn}, {kind: mlp, train: {max_duration: 2ba}}]\n'
        'data: {name: digits}\n'
        f'save_folder: {tmp_path / "run"}\n'
    )
    before = digest(tmp_path)
    with pytest.raises(RecipeError) as info:
        build_run(load_recipe(recipe_file, TINY))
    message = str(info.value)
    assert '1 problem; nothing was trained' in message
    assert 'teachers.0: teacher 0 (cnn) has nothing to teach' in message
    assert 'Add teachers.0.train (e.g. teachers.0.train.max_duration=10ep)' in message
    assert 'or teachers.0.checkpoint' in message
    assert 'teachers.1' not in message  # trained by the recipe: fine
    assert digest(tmp_path) == before and not (tmp_path / 'run').exists()


def test_teachers_given_to_build_run_need_no_train_section():
    recipe = load_recipe('digits', [*TINY, 'teachers.0.train=null'])
    with pytest.raises(RecipeError, match='teachers.0: teacher 0'):
        build_run(recipe)
    torch.manual_seed(0)
    given = build_run(load_recipe('digits', TINY)).teachers
    run = build_run(recipe, teachers=given)
    assert run.teachers[0] is given[0] and run.teacher_trainers == [None]


def _save_bert(path, head: bool, labels: int = 3) -> str:
    """A tiny BERT saved offline: a bare encoder (``BertModel``) or one with a classification head."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=200,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=labels,
    )
    (BertForSequenceClassification if head else BertModel)(config).save_pretrained(path)
    return str(path)


def test_a_hugging_face_teacher_with_a_new_head_is_refused_unless_fine_tuned_first(tmp_path):
    encoder = _save_bert(tmp_path / 'encoder', head=False)
    recipe_file = tmp_path / 'recipe.yaml'
    recipe_file.write_text(
        'student: {kind: hf_config, name: bert, kwargs: {hidden_size: 16, num_hidden_layers: 1, '
        'num_attention_heads: 2, intermediate_size: 32}}\n'
        f'teachers: [{{kind: huggingface, name: {encoder}}}]\n'
        'data: {name: synthetic_text, synthetic_text: {n_train: 64, n_val: 32, seq_len: 24}}\n'
    )
    before = digest(tmp_path)
    with pytest.raises(RecipeError) as info:
        build_run(load_recipe(recipe_file, TINY))
    message = str(info.value)
    assert f'teachers.0.name: teacher 0 would distil from a random head: the Hugging Face model at {encoder}' in message
    assert 'classifier.bias, classifier.weight would be newly initialized' in message
    assert 'Add teachers.0.train' in message and 'teachers.0.checkpoint' in message
    assert digest(tmp_path) == before

    # Fine-tuned by the recipe first, the same encoder is a teacher.
    run = build_run(load_recipe(recipe_file, [*TINY, 'teachers.0.train={max_duration: 2ba}']))
    assert run.teacher_trainers[0] is not None
    # A model saved with its classification head is loaded as it is.
    classifier = _save_bert(tmp_path / 'classifier', head=True)
    run = build_run(load_recipe(recipe_file, [*TINY, f'teachers.0.name={classifier}']))
    assert run.teacher_trainers == [None]


def test_a_recipe_teacher_weaker_than_the_student_alone_is_named_and_the_ratio_omission_explained(tmp_path):
    recipe_file = tmp_path / 'recipe.yaml'
    recipe_file.write_text(
        'baseline: true\n'
        'student: {kind: mlp, hidden: [32]}\n'
        'teachers: [{kind: mlp, hidden: [8], train: {max_duration: 2ba, optimizer: {name: SGD, lr: 0.01}}}]\n'
        'data: {name: digits, batch_size: 64}\n'
        'optimizer: {name: Adam, lr: 0.01}\n'
    )
    before = digest(tmp_path)
    recipe = load_recipe(recipe_file, ['progress_bar=false', 'max_duration=40ba', 'eval_interval=40ba', 'device=cpu'])
    with pytest.warns(WeakTeacherWarning) as caught:
        summary = build_run(recipe).fit()
    teacher, alone = summary.value('teacher 0'), summary.value('student alone')
    assert teacher < alone and summary.ratio is None
    text = format_summary(summary)
    assert 'warning: teacher 0 is weaker than the student trained alone: val MulticlassAccuracy' in text
    assert (
        'warning: distillation ratio on val MulticlassAccuracy omitted: (distilled - alone) / (teacher - alone) '
        'means nothing when the best teacher' in text
    )
    assert 'distillation ratio (distilled' not in text
    assert any('weaker than the student trained alone' in str(w.message) for w in caught)
    assert digest(tmp_path) == before


def test_distill_warns_about_a_teacher_at_chance_level_and_leaves_it_unchanged():
    digits = load_digits_splits()
    torch.manual_seed(3)
    untrained = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    weights = {k: v.clone() for k, v in untrained.state_dict().items()}
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.warns(WeakTeacherWarning, match=r'teacher 0 is at chance level: eval MulticlassAccuracy'):
        _, report = distill(
            untrained, student, digits.train, digits.val, max_duration='20ba', device='cpu', baseline=True
        )
    assert any(line.startswith('teacher 0 is at chance level') for line in report.warnings)
    assert any(line.startswith('distillation ratio on eval MulticlassAccuracy omitted') for line in report.warnings)
    assert 'warning: teacher 0 is at chance level' in format_summary(report)
    assert all(torch.equal(weights[k], v) for k, v in untrained.state_dict().items())


def test_a_good_teacher_gets_no_warning():
    digits = load_digits_splits()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    x, y = digits.train.tensors
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _, report = distill(
            teacher,
            nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
            digits.train,
            digits.val,
            max_duration='4ba',
            device='cpu',
            baseline=True,
        )
    assert report.warnings == [] and report.ratio is not None
    # Nor any warning of Composer's about distill()'s own plumbing (evaluation trainers, small last batches).
    said = [str(w.message) for w in caught]
    assert not [m for m in said if 'No optimizer' in m or 'Cannot split' in m or 'WeakTeacher' in m], said
