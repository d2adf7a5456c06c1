"""Inputs that are accepted either work or are refused by name before training: a last batch of one under
BatchNorm in a recipe, a Hugging Face ``label`` column and unformatted ``datasets.Dataset`` lists in distill()."""

from __future__ import annotations

import datasets
import pytest
import torch

from composer_kd import distill
from composer_kd.recipes import RecipeError, build_run, load_recipe

# digits keeps 897 training images: 7 x 128 + 1.
RESNET_TEACHER = [
    'progress_bar=false',
    'device=cpu',
    'data.digits.channels=3',
    'data.digits.per_class=null',
    'data.digits.keep_unlabelled=false',
    'data.batch_size=128',
    'teachers.0={kind: torchvision, name: resnet18, train: {max_duration: 1ep}}',
    'max_duration=2ba',
    'eval_interval=2ba',
    'baseline=false',
]


def test_a_batch_norm_teacher_drops_a_last_batch_of_one_by_default():
    run = build_run(load_recipe('digits', RESNET_TEACHER))
    teacher_loader = run.teacher_trainers[0].state.train_dataloader
    assert len(teacher_loader.sampler) == 897 and teacher_loader.drop_last
    assert not run.trainer.state.train_dataloader.drop_last  # the MLP student keeps every example
    run.train_teachers()  # a whole epoch of ResNet-18 training, which a batch of one would stop
    assert int(run.teacher_trainers[0].state.timestamp.batch) == 7


def test_keeping_a_last_batch_of_one_under_batch_norm_is_refused_before_training(tmp_path):
    overrides = [*RESNET_TEACHER, 'data.drop_last=false', f'save_folder={tmp_path / "run"}']
    with pytest.raises(RecipeError) as info:
        build_run(load_recipe('digits', overrides))
    assert (
        'data.drop_last: false leaves a last training batch of one example (897 = 7 x 128 + 1), and the BatchNorm '
        'layers of teacher 0 cannot train on one; set data.drop_last: true'
    ) in str(info.value)
    assert not (tmp_path / 'run').exists()
    # Asked for explicitly, drop_last applies to every model, the student too.
    run = build_run(load_recipe('digits', [*RESNET_TEACHER, 'data.drop_last=true']))
    assert run.trainer.state.train_dataloader.drop_last


def _bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _text_dataset(n: int = 16) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (n, 8), generator=generator)
    return datasets.Dataset.from_dict(
        {
            'text': ['a sentence'] * n,
            'input_ids': ids.tolist(),
            'attention_mask': [[1] * 8] * n,
            'label': (ids[:, 1] % 2).tolist(),
        }
    )


def test_a_hugging_face_label_column_is_read_as_labels():
    data = _text_dataset().with_format('torch')
    student, teacher = _bert(1), _bert(0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, report = distill(teacher, student, data, data, max_duration='2ba', batch_size=8, device='cpu')
    assert 0.0 <= report.value('student (distilled)') <= 1.0
    assert data.column_names == ['text', 'input_ids', 'attention_mask', 'label']  # the user's dataset unchanged
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_an_unformatted_dataset_and_a_missing_labels_column_are_named():
    student, teacher = _bert(1), _bert(0)
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(TypeError) as info:
        distill(teacher, student, _text_dataset(), max_duration='2ba', device='cpu')
    assert (
        'train_data: this datasets.Dataset gives Python lists, which batch into lists of tensors whose batch size '
        "Composer cannot tell; give tensors: train_data.set_format('torch', columns=['input_ids', 'attention_mask', "
        "'label'])"
    ) in str(info.value)

    class Rows(torch.utils.data.Dataset):  # dict examples with 'label', not a datasets.Dataset
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {'input_ids': torch.arange(8) + 2, 'attention_mask': torch.ones(8, dtype=torch.long), 'label': i % 2}

    with pytest.raises(ValueError, match=r"train_data: a Hugging Face model computes its loss .* from a 'labels' "):
        distill(teacher, student, Rows(), max_duration='2ba', device='cpu')
    with pytest.raises(ValueError, match=r"'label'; rename it: dataset.rename_column\('label', 'labels'\)"):
        distill(teacher, student, Rows(), max_duration='2ba', device='cpu')

    class Lists(Rows):  # Python lists in the examples: the default collation transposes them
        def __getitem__(self, i):
            return {'input_ids': list(range(2, 10)), 'labels': i % 2}

    with pytest.raises(TypeError, match=r"train_data: batch column 'input_ids' is a list of 8 Tensors, not a tensor"):
        distill(teacher, student, Lists(), max_duration='2ba', device='cpu')
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())
