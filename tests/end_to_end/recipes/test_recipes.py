"""Recipes: built-in ones build ordinary Composer trainers, overrides apply, bad recipes are refused by key."""

from __future__ import annotations

import os

import pytest
import torch
from composer import Callback, Trainer
from composer.algorithms import ChannelsLast, LabelSmoothing
from composer.core import Time, TimeUnit
from composer.loggers import InMemoryLogger

from composer_kd import Distillation
from composer_kd.losses import IGNORE_INDEX, cross_entropy_with_hidden_labels
from composer_kd.recipes import (
    RecipeError,
    build_run,
    build_student_alone,
    builtin_recipes,
    check_recipe,
    distillation_ratio,
    load_recipe,
)
from composer_kd.recipes.data import MixedBatchSampler, load_digits_splits, synthetic_text_classification

# A digits run that takes a second: a few batches for the teacher and the students.
TINY = ['progress_bar=false', 'max_duration=4ba', 'teachers.0.train.max_duration=4ba', 'eval_interval=2ba']


def write(tmp_path, text: str, name: str = 'recipe.yaml') -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refusal(source, overrides=()) -> str:
    """The message of the RecipeError that loading and checking ``source`` raises."""
    with pytest.raises(RecipeError) as info:
        recipe = load_recipe(source, overrides)
        build_run(recipe, source=str(source))
    return str(info.value)


def distillation_of(trainer: Trainer) -> Distillation:
    found = [a for a in trainer.state.algorithms if isinstance(a, Distillation)]
    assert len(found) == 1
    return found[0]


@pytest.fixture
def no_local_models(tmp_path, monkeypatch):
    """An empty Hugging Face cache and working directory, and GLUE_DIR pointing at nothing."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))
    monkeypatch.setenv('GLUE_DIR', str(tmp_path / 'glue'))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- built-in recipes -----------------------------------------------------------------------------------------


def test_builtin_recipes_are_the_four_documented():
    assert list(builtin_recipes()) == ['bert_synthetic', 'digits', 'function_matching', 'glue_qnli']
    for path in builtin_recipes().values():
        assert os.path.isfile(path)


def test_digits_recipe_builds_its_trainer_without_training():
    recipe = load_recipe('digits', ['progress_bar=false'])
    run = build_run(recipe)
    assert isinstance(run.trainer, Trainer)
    distillation = distillation_of(run.trainer)
    # The recipe's distillation settings reach the algorithm unchanged.
    assert distillation.kd_loss_fn.temperature == recipe.distillation.temperature
    assert (distillation.org_loss_weight, distillation.kd_loss_weight) == (
        recipe.distillation.org_loss_weight,
        recipe.distillation.kd_loss_weight,
    )
    assert distillation.teacher_modules == run.teachers
    assert run.trainer.state.max_duration == Time(500, TimeUnit.BATCH)
    assert sum(p.numel() for p in run.student.parameters()) == 64 * 32 + 32 + 32 * 10 + 10
    # The teacher is trained first, by its own ordinary Trainer, and nothing has been trained yet.
    (teacher_trainer,) = run.teacher_trainers
    assert isinstance(teacher_trainer, Trainer)
    assert int(teacher_trainer.state.timestamp.batch) == 0 and int(run.trainer.state.timestamp.batch) == 0
    # The students see 10 labels per class, the teacher every label.
    student_labels = run.trainer.state.train_dataloader.dataset.tensors[1]
    teacher_labels = teacher_trainer.state.train_dataloader.dataset.tensors[1]
    assert int((student_labels != IGNORE_INDEX).sum()) == 100 and len(student_labels) == 897
    assert int((teacher_labels == IGNORE_INDEX).sum()) == 0 and len(teacher_labels) == 897


def test_bert_synthetic_recipe_builds_its_trainer():
    from composer.loggers import ProgressBarLogger
    from composer.models import HuggingFaceModel

    recipe = load_recipe('bert_synthetic')
    run = build_run(recipe)
    # Recipes show Composer's own progress bar unless they say otherwise.
    assert any(isinstance(d, ProgressBarLogger) for d in run.trainer.logger.destinations)
    assert isinstance(run.student, HuggingFaceModel) and isinstance(run.teachers[0], HuggingFaceModel)
    assert run.student.model.config.hidden_size == 32 and run.teachers[0].model.config.num_hidden_layers == 2
    assert run.student.model.config.vocab_size == recipe.data.synthetic_text.vocab_size
    assert distillation_of(run.trainer).kd_loss_fn.temperature == 2.0
    batch = next(iter(run.trainer.state.train_dataloader))
    assert set(batch) == {'input_ids', 'attention_mask', 'labels'} and batch['input_ids'].shape == (32, 24)


def test_glue_recipe_without_local_files_says_what_is_missing_and_where_it_looked(no_local_models):
    message = refusal('glue_qnli')
    cache = no_local_models / 'hf-cache'
    assert '3 problems; nothing was trained' in message
    assert (
        f"student.name: the Hugging Face model 'google/bert_uncased_L-6_H-768_A-12' is not on this machine; "
        f'looked at the local directory {no_local_models}/google/bert_uncased_L-6_H-768_A-12 and at the Hugging '
        f'Face cache {cache}/models--google--bert_uncased_L-6_H-768_A-12'
    ) in message
    assert f'teachers.0.name: the Hugging Face model {"google/bert_uncased_L-12_H-768_A-12"!r}' in message
    assert (
        f'data.glue.folder: the GLUE qnli files are not on this machine: no file at '
        f'{no_local_models}/glue/QNLI/train.tsv nor at {no_local_models}/glue/QNLI/dev.tsv'
    ) in message


def test_hugging_face_models_are_found_in_a_local_directory_or_the_local_cache(no_local_models):
    from composer_kd.recipes.models import find_pretrained

    snapshot = no_local_models / 'hf-cache' / 'models--org--tiny' / 'snapshots' / 'abc123'
    snapshot.mkdir(parents=True)
    (snapshot / 'config.json').write_text('{}')
    (no_local_models / 'hf-cache' / 'models--org--tiny' / 'refs').mkdir()
    (no_local_models / 'hf-cache' / 'models--org--tiny' / 'refs' / 'main').write_text('abc123')
    found, looked = find_pretrained('org/tiny')
    assert found == str(snapshot) and len(looked) == 2
    (no_local_models / 'org' / 'tiny').mkdir(parents=True)  # a local directory of that name wins
    assert find_pretrained('org/tiny')[0] == str(no_local_models / 'org' / 'tiny')
    assert find_pretrained('org/absent') == (
        None,
        [
            f'the local directory {no_local_models}/org/absent',
            f'the Hugging Face cache {no_local_models}/hf-cache/models--org--absent',
        ],
    )


def _local_bert(path, layers: int, vocab: list[str]) -> str:
    """A tiny BERT classifier and its tokenizer saved as a local Hugging Face directory, built offline."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab_file = os.path.join(path, 'vocab.txt')
    with open(vocab_file, 'w') as f:
        f.write('\n'.join(vocab) + '\n')
    BertTokenizerFast(vocab_file=vocab_file).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


def test_glue_recipe_runs_from_local_models_and_files(tmp_path):
    words = ['what', 'is', 'a', 'cat', 'dog', 'the', 'animal', 'sky', 'blue', '?', '.', '"']
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *words]
    teacher = _local_bert(tmp_path / 'bert-12', layers=2, vocab=vocab)
    student = _local_bert(tmp_path / 'bert-6', layers=1, vocab=vocab)
    glue = tmp_path / 'QNLI'
    glue.mkdir()
    rows = [
        ('what is a cat ?', 'a cat is an "animal" .', 'entailment'),
        ('what is the sky ?', 'a dog is blue .', 'not_entailment'),
    ] * 4
    for name in ('train.tsv', 'dev.tsv'):
        lines = ['index\tquestion\tsentence\tlabel'] + [f'{i}\t{q}\t{s}\t{y}' for i, (q, s, y) in enumerate(rows)]
        (glue / name).write_text('\n'.join(lines) + '\n')
    recipe = load_recipe(
        'glue_qnli',
        [
            f'student.name={student}',
            f'teachers.0.name={teacher}',
            f'data.glue.folder={glue}',
            'data.glue.max_length=16',
            'data.batch_size=4',
            'max_duration=2ba',
            'teachers.0.train.max_duration=2ba',
            'progress_bar=false',
        ],
    )
    run = build_run(recipe)
    distillation = distillation_of(run.trainer)
    assert type(distillation.kd_loss_fn).__name__ == 'SoftCrossEntropy'
    assert (distillation.kd_loss_fn.temperature, distillation.org_loss_weight, distillation.kd_loss_weight) == (
        5.0,
        0.5,
        0.2,
    )
    summary = run.fit()
    assert [m.role for m in summary.models] == ['teacher 0', 'student (distilled)', 'student alone']
    assert summary.split == 'dev' and summary.metric == 'MulticlassAccuracy'
    for model in summary.models:
        assert 0.0 <= model.metrics['dev']['MulticlassAccuracy'] <= 1.0
    assert summary.models[0].parameters > summary.models[1].parameters


# --- overrides ------------------------------------------------------------------------------------------------


def test_overrides_apply_to_the_recipe_and_the_built_trainer():
    overrides = [
        'distillation.temperature=2',
        'distillation.kd_loss_weight=0.7',
        'max_duration=5ep',
        'teachers.0.train.max_duration=1ep',
        'data.digits.per_class=5',
        'optimizer.lr=0.02',
        'progress_bar=false',
    ]
    recipe = load_recipe('digits', overrides)
    assert recipe.distillation.temperature == 2.0 and isinstance(recipe.distillation.temperature, float)
    assert recipe.max_duration == '5ep' and recipe.teachers[0].train.max_duration == '1ep'
    run = build_run(recipe)
    distillation = distillation_of(run.trainer)
    assert distillation.kd_loss_fn.temperature == 2.0 and distillation.kd_loss_weight == 0.7
    assert run.trainer.state.max_duration == Time(5, TimeUnit.EPOCH)
    assert run.teacher_trainers[0].state.max_duration == Time(1, TimeUnit.EPOCH)
    assert run.data.notes['labelled'] == 50
    assert run.trainer.state.optimizers[0].param_groups[0]['lr'] == 0.02


def test_later_overrides_win_and_lists_parse():
    recipe = load_recipe('digits', ['seed=1', 'seed=2', 'data.eval_splits=[val,test]', 'algorithms=[ChannelsLast]'])
    assert recipe.seed == 2
    assert recipe.data.eval_splits == ['val', 'test']
    assert recipe.algorithms[0].name == 'ChannelsLast'


def test_other_composer_algorithms_by_name():
    recipe = load_recipe(
        'digits',
        [
            *TINY,
            'data.digits.per_class=null',
            'algorithms=[{name: LabelSmoothing, kwargs: {smoothing: 0.2}}, ChannelsLast]',
        ],
    )
    run = build_run(recipe)
    algorithms = run.trainer.state.algorithms
    smoothing = [a for a in algorithms if isinstance(a, LabelSmoothing)]
    assert len(smoothing) == 1 and smoothing[0].smoothing == 0.2
    assert any(isinstance(a, ChannelsLast) for a in algorithms)
    assert isinstance(algorithms[-1], Distillation)
    run.trainer.fit()  # label smoothing and distillation together train


def test_every_distillation_parameter_reaches_the_algorithm():
    from composer_kd import FeaturePair, LinearSchedule

    second_teacher = '{kind: mlp, hidden: [64], train: {max_duration: 4ba, data: {digits: {per_class: null}}}}'
    recipe = load_recipe(
        'digits',
        [
            *TINY,
            'baseline=false',
            f'teachers=[{{kind: cnn, channels: [8], hidden: [16], train: {{max_duration: 4ba}}}}, {second_teacher}]',
            'distillation.loss=js',
            'distillation.start=2ba',
            'distillation.end=0.9',
            'distillation.n_teachers_to_sample=1',
            'distillation.schedules={temperature: {kind: linear, start_value: 8, end_value: 2}}',
            # The student MLP's first Linear (64 -> 32) against the teacher CNN's hidden Linear (-> 16).
            "distillation.feature_pairs=[{student: '1', teacher: '4.1', loss: cosine, weight: 0.5}]",
        ],
    )
    logged = InMemoryLogger()
    run = build_run(recipe, loggers=lambda role: [logged] if role == 'student (distilled)' else [])
    distillation = distillation_of(run.trainer)
    assert type(distillation.kd_loss_fn).__name__ == 'JensenShannonDivergence'
    assert distillation.start == Time(2, TimeUnit.BATCH) and distillation.end == Time(0.9, TimeUnit.DURATION)
    assert distillation.n_teachers_to_sample == 1 and len(distillation.teacher_modules) == 2
    assert isinstance(distillation.temperature, LinearSchedule) and distillation.temperature.bounds == (2.0, 8.0)
    assert distillation.feature_pairs == [FeaturePair(student='1', teacher='4.1', loss='cosine', weight=0.5)]
    run.fit()
    # Of 4 batches, 2 and 3 begin inside the window [2ba, 0.9 * 4ba = 3.6ba): two distillation steps, each with
    # its feature term (fractions of training are not rounded to whole batches).
    assert [int(t.batch) for t, _ in logged.data['loss/train/kd']] == [2, 3]
    assert [int(t.batch) for t, _ in logged.data['loss/train/feature_0']] == [2, 3]
    assert len(logged.data['loss/train/total']) == 4


def test_a_feature_pair_naming_no_module_is_refused_by_key():
    message = refusal('digits', ["distillation.feature_pairs=[{student: '1', teacher: '9.9'}]"])
    assert "distillation.feature_pairs: The teacher has no module '9.9'" in message


def test_bad_schedules_are_refused_by_key():
    message = refusal('digits', ['distillation.schedules={temprature: {kind: step, start_value: 8, end_value: 2}}'])
    assert "distillation.schedules.temprature: cannot schedule 'temprature'; did you mean 'temperature'?" in message
    assert "distillation.schedules.temprature.kind: unknown schedule 'step'" in message
    message = refusal('digits', ['distillation.schedules={temperature: {kind: linear, start_value: 8}}'])
    assert 'distillation.schedules.temperature.end_value: required, expected a number' in message


def test_a_constructor_refusing_its_arguments_is_reported_by_key():
    overrides = ['data.digits.per_class=null', 'algorithms=[{name: LabelSmoothing, kwargs: {smoothin: 0.2}}]']
    message = refusal('digits', overrides)
    assert "algorithms.0: LabelSmoothing refused {'smoothin': 0.2}" in message


# --- bad recipes ----------------------------------------------------------------------------------------------


def test_unknown_key_is_named_with_the_nearest_known_one(tmp_path):
    path = write(
        tmp_path,
        'student: {kind: mlp}\nteachers: [{kind: cnn}]\ndata: {name: digits}\ndistillation:\n  temprature: 2\n',
    )
    message = refusal(path)
    assert "distillation.temprature: unknown key; did you mean 'distillation.temperature'?" in message
    assert str(path) in message and 'nothing was trained' in message


def test_unknown_keys_in_lists_and_overrides_are_named_by_their_full_key():
    message = refusal('digits', ['teachers.0.chekpoint=teacher.pt', 'max_durations=2ep'])
    assert "teachers.0.chekpoint: unknown key; did you mean 'teachers.0.checkpoint'?" in message
    assert "max_durations: unknown key; did you mean 'max_duration'?" in message
    assert '2 problems' in message


def test_wrong_types_say_what_was_expected():
    message = refusal('digits', ['data.batch_size=many', 'distillation.temperature=hot', 'student.hidden=32'])
    assert "data.batch_size: expected an integer, got 'many' (a string)" in message
    assert "distillation.temperature: expected a number, got 'hot' (a string)" in message
    assert 'student.hidden: expected a list of integers, got 32 (an integer)' in message


def test_missing_required_sections_are_named(tmp_path):
    message = refusal(write(tmp_path, 'data: {name: digits}\n'))
    assert 'student: required, expected a section with keys kind, name' in message
    assert 'teachers: required, expected a list of' in message


def test_missing_files_are_named_with_their_absolute_path(tmp_path):
    missing = tmp_path / 'nowhere' / 'teacher.pt'
    message = refusal('digits', [f'teachers.0.checkpoint={missing}'])
    assert f'teachers.0.checkpoint: checkpoint not found: no file at {missing}' in message
    message = refusal(str(tmp_path / 'no_such_recipe.yaml'))
    assert f'no file at {tmp_path}/no_such_recipe.yaml and no built-in recipe' in message


def test_unknown_built_in_recipe_suggests_the_nearest():
    assert "did you mean the built-in recipe 'digits'?" in refusal('digit')


@pytest.mark.parametrize(
    'override, expected',
    [
        ('student.kind=transformer', "student.kind: unknown model kind 'transformer'"),
        ('teachers.0.kind=torchvision', 'teachers.0.name: unknown torchvision model None'),
        ('data.name=digitz', "data.name: unknown dataset 'digitz'; did you mean 'digits'?"),
        (
            'algorithms=[LabelSmothing]',
            "algorithms.0.name: unknown algorithm 'LabelSmothing'; did you mean 'LabelSmoothing'?",
        ),
        ('distillation.loss=kld', "distillation.loss: unknown loss 'kld'"),
        ('optimizer.name=Adamm', "optimizer.name: unknown optimizer 'Adamm'; did you mean 'Adam'?"),
        ('scheduler={name: CosineScheduler}', "scheduler.name: unknown scheduler 'CosineScheduler'"),
        ('loggers=[WandbLogger]', "loggers.0.name: unknown logger 'WandbLogger'; did you mean 'WandBLogger'?"),
        ('precision=fp64', "precision: unknown precision 'fp64'"),
        ('max_duration=5', "max_duration: expected a Composer time string such as '10ep'"),
        ('distillation.start=1.5', 'distillation.start: expected a fraction of training in [0, 1]'),
        ('distillation.n_teachers_to_sample=2', 'distillation.n_teachers_to_sample: expected an integer from 1 to'),
    ],
)
def test_unknown_names_and_bad_values_are_refused(override, expected):
    assert expected in refusal('digits', [override])


def test_unknown_torchvision_and_hugging_face_names_get_suggestions():
    message = refusal('digits', ['teachers.0.kind=torchvision', 'teachers.0.name=resnet19'])
    assert "teachers.0.name: unknown torchvision model 'resnet19'; did you mean 'resnet18'?" in message
    message = refusal('bert_synthetic', ['student.name=berta'])
    assert "student.name: unknown Hugging Face model type 'berta'" in message


def test_label_smoothing_is_refused_with_hidden_labels():
    message = refusal('digits', ['algorithms=[LabelSmoothing]'])
    assert 'algorithms.0.name: LabelSmoothing turns labels into distributions' in message


def test_every_problem_is_reported_before_anything_is_built():
    problems = check_recipe(load_recipe('digits', ['data.name=digitz', 'optimizer.lr=-1', 'eval_interval=often']))
    assert [p.split(':')[0] for p in problems] == ['data.name', 'optimizer.lr', 'eval_interval']


def test_invalid_yaml_and_bad_override_syntax_are_refused(tmp_path):
    assert 'is not valid YAML' in refusal(write(tmp_path, 'student: [unclosed\n'))
    assert "override 'distillation.temperature': expected key=value" in refusal('digits', ['distillation.temperature'])


# --- teachers from checkpoints and torchvision constructors ---------------------------------------------------


def test_teacher_trained_by_one_recipe_is_loaded_from_its_composer_checkpoint_by_another(tmp_path):
    first = build_run(load_recipe('digits', [*TINY, 'baseline=false', f'save_folder={tmp_path}/run']))
    summary = first.fit()
    checkpoint = summary.models[0].checkpoint
    assert checkpoint is not None and checkpoint.startswith(f'{tmp_path}/run/teacher-0/')
    second = build_run(load_recipe('digits', [*TINY, f'teachers.0.checkpoint={checkpoint}', 'teachers.0.train=null']))
    assert second.teacher_trainers == [None]
    trained, loaded = first.teachers[0].state_dict(), second.teachers[0].state_dict()
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert distillation_of(second.trainer).teacher_modules[0] is second.teachers[0]


def test_torchvision_teacher_from_a_state_dict_file(tmp_path):
    import torchvision

    weights = torchvision.models.resnet18(num_classes=10).state_dict()
    path = tmp_path / 'resnet18.pt'
    torch.save(weights, path)
    recipe = load_recipe(
        'digits',
        [
            *TINY,
            'teachers.0.kind=torchvision',
            'teachers.0.name=resnet18',
            f'teachers.0.checkpoint={path}',
            'teachers.0.train=null',
            'data.digits.channels=3',
            'baseline=false',
        ],
    )
    run = build_run(recipe)
    assert torch.equal(run.teachers[0].module.conv1.weight, weights['conv1.weight'])
    summary = run.fit()
    assert summary.models[0].parameters == sum(
        w.numel() for k, w in weights.items() if 'running' not in k and 'num_batches' not in k
    )


# --- fairness of the comparison -------------------------------------------------------------------------------


class BatchRecorder(Callback):
    def __init__(self):
        self.inputs = []

    def after_dataloader(self, state, logger):
        self.inputs.append((state.batch[0].clone(), state.batch[1].clone()))


def test_distilled_student_and_student_alone_start_equal_and_see_identical_batches():
    recipe = load_recipe('digits', [*TINY, 'max_duration=6ba'])
    distilled_batches, alone_batches = BatchRecorder(), BatchRecorder()
    run = build_run(recipe, callbacks=[distilled_batches])
    alone, alone_trainer = build_student_alone(recipe, run.data, callbacks=[alone_batches])
    start = {k: v.clone() for k, v in run.student.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in alone.state_dict().items())
    run.train_teachers()  # consumes random numbers between the two student fits, as a real run does
    run.trainer.fit()
    alone_trainer.fit()
    assert len(distilled_batches.inputs) == len(alone_batches.inputs) == 6
    for (x1, y1), (x2, y2) in zip(distilled_batches.inputs, alone_batches.inputs, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert int((y1 != IGNORE_INDEX).sum()) == 16 and len(y1) == 64


def test_a_run_reports_every_model_and_the_distillation_ratio():
    summary = build_run(load_recipe('digits', TINY)).fit()
    roles = [m.role for m in summary.models]
    assert roles == ['teacher 0', 'student (distilled)', 'student alone']
    values = {m.role: m.metrics['val']['MulticlassAccuracy'] for m in summary.models}
    assert summary.ratio == distillation_ratio(
        values['teacher 0'], values['student alone'], values['student (distilled)']
    )
    assert summary.models[0].train_seconds > 0 and summary.wall_seconds > 0


def test_distillation_ratio():
    assert distillation_ratio(teacher=0.9, alone=0.8, distilled=0.85) == pytest.approx(0.5)
    assert distillation_ratio(teacher=0.9, alone=0.8, distilled=0.75) == pytest.approx(-0.5)
    assert distillation_ratio(teacher=0.8, alone=0.8, distilled=0.9) is None


# --- offline data ---------------------------------------------------------------------------------------------


def test_digits_splits_are_stratified_disjoint_and_fixed_by_the_split_seed():
    splits = load_digits_splits(per_class=10, keep_unlabelled=True)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sizes == [897, 360, 540] and sum(sizes) == 1797
    labels = splits.train.tensors[1]
    assert splits.n_labelled == 100
    assert torch.bincount(labels[labels != IGNORE_INDEX], minlength=10).tolist() == [10] * 10
    again = load_digits_splits(per_class=10, keep_unlabelled=True)
    assert torch.equal(again.test.tensors[0], splits.test.tensors[0])
    assert float(splits.train.tensors[0].max()) == 1.0 and splits.train.tensors[0].shape[1:] == (1, 8, 8)


def test_mixed_batches_hold_a_fixed_number_of_labels_and_depend_only_on_seed_and_epoch():
    labels = torch.tensor([0, 1, 2] + [IGNORE_INDEX] * 20)
    sampler = MixedBatchSampler(labels, labelled_per_batch=2, batch_size=6, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 5
    # Labelled examples are cycled pass after pass: 10 drawn from 3 is three full passes and one more.
    labelled_seen = [i for batch in first for i in batch if labels[i] != IGNORE_INDEX]
    assert [labelled_seen.count(i) for i in range(3)] in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    for batch in first:
        assert sum(int(labels[i] != IGNORE_INDEX) for i in batch) == 2 and len(set(batch)) == 6
    unlabelled_seen = sorted(i for batch in first for i in batch if labels[i] == IGNORE_INDEX)
    assert unlabelled_seen == list(range(3, 23))
    second = list(sampler)
    assert second != first  # a new epoch, a new order
    fresh = MixedBatchSampler(labels, labelled_per_batch=2, batch_size=6, seed=3)
    assert list(fresh) == first
    fresh.set_epoch(1)
    assert list(fresh) == second
    with pytest.raises(ValueError, match='needs at least 4 labelled'):
        MixedBatchSampler(labels, labelled_per_batch=4, batch_size=6)


def test_cross_entropy_skips_hidden_labels_and_is_zero_without_any():
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([0, IGNORE_INDEX, 2, IGNORE_INDEX])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    assert torch.allclose(cross_entropy_with_hidden_labels(logits, targets), expected)
    none = cross_entropy_with_hidden_labels(logits, torch.full((4,), IGNORE_INDEX))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_synthetic_text_labels_follow_the_keyword_rule():
    data = synthetic_text_classification(
        200, vocab_size=60, seq_len=16, n_classes=3, keywords_per_class=4, label_noise=0.0
    )
    ids, mask, labels = data.columns['input_ids'], data.columns['attention_mask'], data.columns['labels']
    assert ids.shape == (200, 16) and torch.all(ids[:, 0] == 1) and torch.all(ids[mask == 0] == 0)
    counts = torch.stack([((ids >= 2 + 4 * c) & (ids < 2 + 4 * (c + 1))).sum(1) for c in range(3)], dim=1)
    assert torch.all(counts.gather(1, labels[:, None]).squeeze(1) == counts.max(1).values)


def test_the_function_matching_recipe_is_the_examples_chosen_setting():
    from conftest import load_example
    from omegaconf import OmegaConf

    example = load_example('function_matching')
    shipped = OmegaConf.to_container(OmegaConf.structured(load_recipe('function_matching')))
    overrides = example.student_overrides(0, example.CHOSEN, distilled=True)
    by_example = OmegaConf.to_container(OmegaConf.structured(load_recipe('digits', overrides)))
    for differs in ('name', 'description', 'baseline', 'progress_bar', 'device'):  # how the example runs it
        shipped.pop(differs), by_example.pop(differs)
    assert shipped == by_example
