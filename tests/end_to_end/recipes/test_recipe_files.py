"""Recipes on the user's own files: an ImageFolder tree, CSV / JSON Lines files and a datasets folder, each
checked before anything trains and run end to end on a tiny dataset written here."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import EXAMPLES
from PIL import Image

from composer_kd.recipes import RecipeError, build_run, load_recipe

RUN = ['progress_bar=false', 'device=cpu', 'max_duration=12ba', 'eval_interval=12ba', 'baseline=true']


def write_images(root, classes=('a', 'b', 'c'), per_split=(('train', 12), ('val', 4)), size=10) -> str:
    """Grayscale PNGs in class folders: class k has a bright band of rows at position k, over noise."""
    rng = np.random.default_rng(0)
    for split, n in per_split:
        for k, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = (rng.random((size, size)) * 80).astype(np.uint8)
                pixels[3 * k : 3 * k + 3, :] = 255
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
    return str(root)


def write_recipe(tmp_path, data: str, student='{kind: mlp, hidden: [16]}', teacher=None) -> str:
    teacher = teacher or '{kind: cnn, channels: [8], hidden: [16], train: {max_duration: 12ba}}'
    path = tmp_path / 'recipe.yaml'
    path.write_text(f'student: {student}\nteachers: [{teacher}]\ndata: {data}\noptimizer: {{name: Adam, lr: 0.01}}\n')
    return str(path)


def accuracy(model, dataset) -> float:
    """The model's accuracy on every example of ``dataset``, computed here, apart from the run."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset))
    batch = next(iter(loader))
    model.eval()
    with torch.no_grad():
        output = model(batch)
    logits = output.logits if hasattr(output, 'logits') else output
    labels = batch['labels'] if isinstance(batch, dict) else batch[1]
    return (logits.argmax(dim=1) == labels).float().mean().item()


def test_an_image_folder_recipe_runs_and_reports_what_a_separate_evaluation_finds(tmp_path):
    images = write_images(tmp_path / 'images')
    data = (
        f'{{name: image_folder, batch_size: 8, image_folder: {{folder: {images}, channels: 1, image_size: 8, '
        'train_transforms: [{name: RandomRotation, kwargs: {degrees: 5}}], eval_transforms: [Identity]}}'
    )
    run = build_run(load_recipe(write_recipe(tmp_path, data), RUN))
    assert run.data.task.input_shape == (1, 8, 8) and run.data.task.num_classes == 3
    assert sorted(run.data.splits) == ['val'] and len(run.data.train) == 36
    summary = run.fit()
    assert [m.role for m in summary.models] == ['teacher 0', 'student (distilled)', 'student alone']
    assert summary.split == 'val'
    reported = summary.value('student (distilled)')
    assert reported == pytest.approx(accuracy(run.student, run.data.splits['val']), abs=1e-6)
    assert round(reported * 12) == pytest.approx(reported * 12, abs=1e-4)  # 12 validation images


def test_image_folder_problems_are_named_before_anything_is_built(tmp_path):
    images = write_images(tmp_path / 'images')
    os.makedirs(os.path.join(images, 'val', 'd'))
    Image.new('L', (10, 10)).save(os.path.join(images, 'val', 'd', '0.png'))
    data = (
        f'{{name: image_folder, image_folder: {{folder: {images}, channels: 2, '
        'train_transforms: [RandomHorizontalFlp]}}'
    )
    message = str(pytest.raises(RecipeError, build_run, load_recipe(write_recipe(tmp_path, data), RUN)).value)
    assert 'data.image_folder.channels: expected 1 (grayscale) or 3 (RGB), got 2' in message
    assert (
        "data.image_folder.train_transforms.0.name: unknown transform 'RandomHorizontalFlp'; did you mean "
        "'RandomHorizontalFlip'?"
    ) in message
    assert 'data.image_folder.folder: the classes of val/ differ from those of train/: d only in val/' in message
    missing = f'{{name: image_folder, image_folder: {{folder: {tmp_path / "nowhere"}}}}}'
    message = str(pytest.raises(RecipeError, build_run, load_recipe(write_recipe(tmp_path, missing), RUN)).value)
    assert f'data.image_folder.folder: no folder at {tmp_path / "nowhere"}' in message


def test_a_model_that_cannot_take_the_images_is_named_with_the_key_to_change(tmp_path):
    images = write_images(tmp_path / 'images')
    data = f'{{name: image_folder, image_folder: {{folder: {images}, channels: 1}}}}'
    teacher = '{kind: torchvision, name: resnet18, train: {max_duration: 2ba}}'
    recipe = load_recipe(write_recipe(tmp_path, data, teacher=teacher), [*RUN, f'save_folder={tmp_path / "run"}'])
    message = str(pytest.raises(RecipeError, build_run, recipe).value)
    assert 'teachers.0: teacher 0 cannot take this data: on a batch ([2, 1, 10, 10] float32, [2] int64)' in message
    assert 'Torchvision models take 3-channel images: set data.image_folder.channels: 3' in message
    assert not (tmp_path / 'run').exists()  # refused before any trainer made a run folder
    assert build_run(load_recipe(recipe_path := write_recipe(tmp_path, data.replace('1}', '3}'), teacher=teacher)))
    assert os.path.isfile(recipe_path)


def _tokenizer(path, words) -> str:
    from transformers import BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, 'vocab.txt')
    with open(vocab, 'w') as f:
        f.write('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *words]) + '\n')
    BertTokenizerFast(vocab_file=vocab).save_pretrained(path)
    return str(path)


WORDS = ['good', 'great', 'fine', 'bad', 'awful', 'poor', 'the', 'film', 'was', 'plot']
BERT = (
    '{kind: hf_config, name: bert, '
    'kwargs: {hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}'
)


def _reviews(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(['good', 'great', 'fine'] if positive else ['bad', 'awful', 'poor'])
        rows.append({'review': f'the film was {word}', 'sentiment': 'pos' if positive else 'neg'})
    return rows


def test_a_text_recipe_from_csv_and_json_lines_files(tmp_path):
    import csv

    tokenizer = _tokenizer(tmp_path / 'tokenizer', WORDS)
    with open(tmp_path / 'train.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, ['review', 'sentiment'])
        writer.writeheader()
        writer.writerows(_reviews(32, 0))
    (tmp_path / 'val.jsonl').write_text('\n'.join(json.dumps(row) for row in _reviews(10, 1)) + '\n')
    files = f'{{train: {tmp_path / "train.csv"}, val: {tmp_path / "val.jsonl"}}}'
    data = (
        f'{{name: text, batch_size: 8, text: {{files: {files}, '
        f'text_column: review, label_column: sentiment, tokenizer: {tokenizer}, max_length: 8}}}}'
    )
    teacher = BERT[:-1] + ', train: {max_duration: 12ba}}'
    run = build_run(load_recipe(write_recipe(tmp_path, data, student=BERT, teacher=teacher), RUN))
    assert run.data.task.num_classes == 2 and run.data.task.vocab_size == 15
    assert run.data.splits['val'].columns['labels'].tolist() == [1, 0] * 5  # 'neg' < 'pos'
    summary = run.fit()
    reported = summary.value('student (distilled)')
    assert summary.split == 'val' and reported == pytest.approx(accuracy(run.student, run.data.splits['val']))


def test_a_text_recipe_from_a_datasets_folder(tmp_path):
    import datasets

    tokenizer = _tokenizer(tmp_path / 'tokenizer', WORDS)
    features = datasets.Features(
        {'review': datasets.Value('string'), 'label': datasets.ClassLabel(names=['neg', 'pos'])}
    )

    def split(rows):
        return datasets.Dataset.from_dict(
            {'review': [r['review'] for r in rows], 'label': [int(r['sentiment'] == 'pos') for r in rows]},
            features=features,
        )

    folder = tmp_path / 'reviews'
    # str: the fsspec that llm-foundry pins does not take a Path.
    datasets.DatasetDict({'train': split(_reviews(24, 0)), 'test': split(_reviews(8, 1))}).save_to_disk(str(folder))
    data = f'{{name: text, text: {{folder: {folder}, text_column: review, tokenizer: {tokenizer}, max_length: 8}}}}'
    teacher = BERT[:-1] + ', train: {max_duration: 2ba}}'
    run = build_run(
        load_recipe(write_recipe(tmp_path, data, student=BERT, teacher=teacher), [*RUN, 'max_duration=2ba'])
    )
    assert list(run.data.splits) == ['test']  # no val split: the other one is evaluated
    assert run.data.splits['test'].columns['labels'].tolist() == [1, 0] * 4
    summary = run.fit()
    assert summary.split == 'test' and 0.0 <= summary.value('student (distilled)') <= 1.0


def test_text_problems_are_named(tmp_path):
    tokenizer = _tokenizer(tmp_path / 'tokenizer', WORDS)
    (tmp_path / 'train.jsonl').write_text('\n'.join(json.dumps(r) for r in _reviews(8, 0)))
    val = [*_reviews(4, 1), {'review': 'the plot', 'sentiment': 'mixed'}]
    (tmp_path / 'val.jsonl').write_text('\n'.join(json.dumps(r) for r in val))
    files = f'files: {{train: {tmp_path / "train.jsonl"}, val: {tmp_path / "val.jsonl"}}}'
    teacher = BERT[:-1] + ', train: {max_duration: 2ba}}'

    data = f'{{name: text, text: {{{files}, text_column: reveiw, label_column: sentiment}}}}'
    message = str(pytest.raises(RecipeError, build_run, load_recipe(write_recipe(tmp_path, data, BERT, teacher))).value)
    assert "data.text.text_column: split 'train' has no column 'reveiw'; did you mean 'review'?" in message
    assert 'data.text.tokenizer: required unless the student is a huggingface model' in message

    data = f'{{name: text, text: {{{files}, text_column: review, label_column: sentiment, tokenizer: {tokenizer}}}}}'
    message = str(pytest.raises(RecipeError, build_run, load_recipe(write_recipe(tmp_path, data, BERT, teacher))).value)
    assert "data.text.label_column: split 'val' holds labels the training split does not: 'mixed'" in message


def test_a_teacher_whose_tokenizer_reads_the_data_differently_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    ours = _tokenizer(tmp_path / 'ours', WORDS)
    theirs = _tokenizer(tmp_path / 'theirs', list(reversed(WORDS)))  # the same words under other ids
    BertForSequenceClassification(
        BertConfig(vocab_size=15, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(theirs)
    (tmp_path / 'train.jsonl').write_text('\n'.join(json.dumps(r) for r in _reviews(8, 0)))
    (tmp_path / 'val.jsonl').write_text('\n'.join(json.dumps(r) for r in _reviews(4, 1)))
    data = (
        f'{{name: text, text: {{files: {{train: {tmp_path / "train.jsonl"}, val: {tmp_path / "val.jsonl"}}}, '
        f'text_column: review, label_column: sentiment, tokenizer: {ours}}}}}'
    )
    teacher = f'{{kind: huggingface, name: {theirs}, train: {{max_duration: 2ba}}}}'
    message = str(pytest.raises(RecipeError, build_run, load_recipe(write_recipe(tmp_path, data, BERT, teacher))).value)
    assert (
        f'teachers.0.name: the tokenizer at {theirs} splits the data differently from the one that tokenizes them'
        in message
    )
    assert '8 of 8 sampled texts get other token ids' in message


def test_the_imagefolder_example_writes_the_digits_and_runs_its_recipe(tmp_path):
    import importlib.util
    import sys

    path = str(EXAMPLES / 'imagefolder_distillation.py')
    spec = importlib.util.spec_from_file_location('composer_kd_example_imagefolder', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    summary = module.main(['--output-dir', str(tmp_path), '--tiny', 'device=cpu'])
    counts = {s: sum(len(f) for _, _, f in os.walk(tmp_path / 'images' / s)) for s in ('train', 'val', 'test')}
    assert counts == {'train': 897, 'val': 360, 'test': 540}
    assert sorted(os.listdir(tmp_path / 'images' / 'train')) == [str(d) for d in range(10)]
    assert [m.role for m in summary.models] == ['teacher 0', 'student (distilled)', 'student alone']
    assert summary.models[0].description == 'trained here: torchvision resnet18'
    assert set(summary.models[1].metrics) == {'val', 'test'}
    assert (tmp_path / 'summary.json').is_file()
