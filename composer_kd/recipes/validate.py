"""Checks of a recipe that need the registries and the file system: names, files, times, numbers.

:func:`check_recipe` returns every problem, each starting with the dotted key it concerns, so a user fixes
them in one go; :func:`composer_kd.recipes.build.build_run` refuses a recipe with any, before building a
thing. Nothing here downloads or trains.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

from composer_kd.compression import QAT_BACKENDS
from composer_kd.losses import LOSS_ALIASES, LOSSES, canonical_loss_name, loss_from_name
from composer_kd.options import conflicts_among, given_options
from composer_kd.parts.features import FEATURE_LOSSES, FeaturePair
from composer_kd.parts.onpolicy import OnPolicy
from composer_kd.recipes.data import GLUE_TASKS, glue_files
from composer_kd.recipes.datasets import DATASETS, FILE_DATASETS
from composer_kd.recipes.files import check_image_folder, check_text_files
from composer_kd.recipes.loader import Problems, nearest, teacher_data_spec
from composer_kd.recipes.models import IMAGE_KINDS, MODEL_KINDS, TEXT_KINDS, find_pretrained, has_uri_scheme
from composer_kd.recipes.run_folder import run_folder_problems
from composer_kd.recipes.schema import (
    ComponentSpec,
    DataSpec,
    ModelSpec,
    OptimizerSpec,
    Recipe,
    TeacherSpec,
)
from composer_kd.recipes.tasks import check_tasks, data_tasks, model_tasks, task_teachers
from composer_kd.run.training import (
    COMPOSER_MODULES,
    DEVICES,
    PRECISIONS,
    composer_algorithm,
    composer_class,
    composer_classes,
    composer_logger,
    composer_scheduler,
    optimizer_class,
    optimizer_names,
)
from composer_kd.schedules import SCHEDULES
from composer_kd.window import parse_time, time_or_fraction

# Besides check_recipe, lookups that now live in composer_kd.run.training and composer_kd.recipes.tasks, importable
# from here as before.
__all__ = [
    'check_recipe',
    'composer_algorithm',
    'composer_logger',
    'composer_scheduler',
    'data_tasks',
    'model_tasks',
    'optimizer_class',
    'task_teachers',
]

_SCHEDULED = ('temperature', 'org_loss_weight', 'kd_loss_weight')
# Algorithms that rewrite class-index targets, which hidden labels (-100) would break.
_LABEL_MIXING = ('LabelSmoothing', 'MixUp', 'CutMix')


def _check_time(value: Optional[str], key: str, problems: Problems, allow_fraction: bool = False) -> None:
    """A time as ``Distillation`` and the other algorithms read it (:func:`~composer_kd.window.parse_time`)."""
    if value is None:
        return
    point = time_or_fraction(value) if allow_fraction else value
    try:
        parse_time(point, key)
    except (TypeError, ValueError):
        if isinstance(point, float):
            problems.add(key, f'expected a fraction of training in [0, 1] or a time string, got {value!r}')
        else:
            problems.add(
                key,
                f"expected a Composer time string such as '10ep', '500ba', '2048sp' or '0.5dur', got {value!r}",
            )


def _check_file(path: Optional[str], key: str, problems: Problems, what: str) -> None:
    if path and not has_uri_scheme(path) and not os.path.isfile(os.path.expanduser(path)):
        problems.add(key, f'{what} not found: no file at {os.path.abspath(os.path.expanduser(path))}')


def _check_pretrained(name: Optional[str], key: str, problems: Problems, what: str = 'Hugging Face model') -> None:
    if not name:
        problems.add(key, f'required: a local directory or a Hub id in the local cache holding the {what}')
        return
    directory, looked = find_pretrained(name)
    if directory is None:
        problems.add(
            key,
            f'the {what} {name!r} is not on this machine; looked at {" and at ".join(looked)}. Nothing is '
            f'downloaded: put it there (e.g. with huggingface-cli download on a machine with network access, then '
            f'copy the cache) or pass {key}=/path/to/its/directory',
        )


def _check_model(spec: ModelSpec, key: str, modality: Optional[str], problems: Problems) -> None:
    if spec.kind not in MODEL_KINDS:
        problems.add(
            f'{key}.kind',
            f'unknown model kind {spec.kind!r}{nearest(spec.kind, MODEL_KINDS)} (known: {", ".join(MODEL_KINDS)})',
        )
        return
    if modality == 'image' and spec.kind in TEXT_KINDS or modality == 'text' and spec.kind in IMAGE_KINDS:
        problems.add(f'{key}.kind', f'a {spec.kind} model cannot take the {modality} inputs of this dataset')
    if modality == 'lm' and spec.kind not in TEXT_KINDS:
        problems.add(
            f'{key}.kind',
            f'a {spec.kind} model cannot learn token sequences: use hf_config (e.g. name: gpt2) or huggingface '
            '(a causal language model on disk)',
        )
    if spec.kind == 'torchvision':
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if spec.name not in known:
            problems.add(
                f'{key}.name',
                f'unknown torchvision model {spec.name!r}{nearest(str(spec.name), known)} '
                '(expected a constructor of torchvision.models, e.g. resnet18)',
            )
        if 'weights' in spec.kwargs:
            problems.add(f'{key}.kwargs.weights', 'pretrained weights would be downloaded; load a checkpoint instead')
    elif spec.kind == 'hf_config':
        from transformers import CONFIG_MAPPING

        known = list(CONFIG_MAPPING.keys())
        if spec.name not in known:
            problems.add(
                f'{key}.name',
                f'unknown Hugging Face model type {spec.name!r}{nearest(str(spec.name), known)} '
                '(expected a model type such as bert, distilbert, roberta)',
            )
    elif spec.kind == 'huggingface':
        _check_pretrained(spec.name, f'{key}.name', problems)
    elif spec.kind in ('mlp', 'cnn'):
        for name, widths in (('hidden', spec.hidden), ('channels', spec.channels)):
            if any(w < 1 for w in widths):
                problems.add(f'{key}.{name}', f'expected positive widths, got {list(widths)}')
    if not 0.0 <= spec.dropout < 1.0:
        problems.add(f'{key}.dropout', f'expected a probability in [0, 1), got {spec.dropout}')
    _check_file(spec.checkpoint, f'{key}.checkpoint', problems, 'checkpoint')


def _check_optimizer(spec: OptimizerSpec, key: str, problems: Problems) -> None:
    if optimizer_class(spec.name) is None:
        names = optimizer_names()
        problems.add(
            f'{key}.name',
            f'unknown optimizer {spec.name!r}{nearest(spec.name, names)} (known, from composer.optim and '
            f'torch.optim: {", ".join(names)})',
        )
    if not spec.lr > 0:
        problems.add(f'{key}.lr', f'expected a learning rate > 0, got {spec.lr}')
    if spec.weight_decay < 0:
        problems.add(f'{key}.weight_decay', f'expected a number >= 0, got {spec.weight_decay}')


def _check_component(spec: Optional[ComponentSpec], key: str, problems: Problems, kind: str) -> None:
    if spec is None or composer_class(kind, spec.name) is not None:
        return
    known = composer_classes(kind)
    problems.add(
        f'{key}.name',
        f'unknown {kind} {spec.name!r}{nearest(spec.name, known)} (expected a class of '
        f'{COMPOSER_MODULES[kind]}: {", ".join(known)})',
    )


def _check_mds(spec: DataSpec, key: str, problems: Problems, student: ModelSpec) -> None:
    """The MDS dataset's splits exist and hold a column of token ids; its numbers are in range."""
    from composer_kd.recipes.mds_data import TOKEN_COLUMNS, mds_columns, resolve_token_column

    o = spec.mds
    if o.max_seq_len < 2:
        problems.add(f'{key}.max_seq_len', f'expected an integer >= 2 (a token and the next), got {o.max_seq_len}')
    if o.vocab_size is not None and o.vocab_size < 1:
        problems.add(f'{key}.vocab_size', f'expected an integer >= 1, got {o.vocab_size}')
    if o.check_samples < 1:
        problems.add(f'{key}.check_samples', f'expected an integer >= 1, got {o.check_samples}')
    try:
        np.dtype(o.token_dtype)
        if not np.issubdtype(np.dtype(o.token_dtype), np.integer):
            raise TypeError
    except TypeError:
        problems.add(
            f'{key}.token_dtype', f'expected an integer type such as int64, uint16 or int32, got {o.token_dtype!r}'
        )
    if not o.path:
        problems.add(f'{key}.path', 'required: a folder or a URI (s3://...) holding one MDS folder per split')
        return
    for split in [o.train_split, *(spec.eval_splits if spec.eval_splits is not None else ['val'])]:
        try:
            columns = mds_columns(o, split)
        except FileNotFoundError as e:
            problems.add(
                f'{key}.path',
                f'split {split!r} is not an MDS dataset: no index at {e} (expected {o.path}/{split}/index.json, '
                'as streaming.MDSWriter writes it)',
            )
            continue
        except Exception as e:  # an unreachable object store, bad credentials: say which and why
            problems.add(f'{key}.path', f'split {split!r} could not be read: {type(e).__name__}: {e}')
            continue
        if resolve_token_column(columns, o.column) is None:
            wanted = repr(o.column) if o.column else ' or '.join(repr(c) for c in TOKEN_COLUMNS)
            problems.add(
                f'{key}.column',
                f'split {split!r} has no column {wanted} of token ids; its columns: {", ".join(columns) or "none"}',
            )
    if student.kind == 'hf_config' and o.vocab_size is None and 'vocab_size' not in student.kwargs:
        problems.add(
            f'{key}.vocab_size',
            'required for a student built from a config (hf_config): the size of the vocabulary the token ids '
            'come from (or give student.kwargs.vocab_size)',
        )


def _check_data(spec: DataSpec, key: str, problems: Problems, student: ModelSpec) -> None:
    if spec.name not in DATASETS:
        problems.add(
            f'{key}.name',
            f'unknown dataset {spec.name!r}{nearest(spec.name, DATASETS)} (known: {", ".join(DATASETS)})',
        )
        return
    for name in ('batch_size', 'eval_batch_size'):
        if getattr(spec, name) < 1:
            problems.add(f'{key}.{name}', f'expected an integer >= 1, got {getattr(spec, name)}')
    splits = DATASETS[spec.name][1]
    for i, split in enumerate(spec.eval_splits or []):
        if spec.name not in FILE_DATASETS and split not in splits:
            problems.add(
                f'{key}.eval_splits.{i}', f'{spec.name} has no split {split!r} (its splits: {", ".join(splits)})'
            )
    if spec.name == 'digits':
        d = spec.digits
        if d.channels < 1:
            problems.add(f'{key}.digits.channels', f'expected an integer >= 1, got {d.channels}')
        if d.per_class is not None and not 1 <= d.per_class <= 50:
            problems.add(f'{key}.digits.per_class', f'expected 1 to 50 labelled images per class, got {d.per_class}')
        if d.labelled_per_batch is not None and not 0 < d.labelled_per_batch < spec.batch_size:
            problems.add(
                f'{key}.digits.labelled_per_batch',
                f'expected an integer in [1, batch_size={spec.batch_size}), got {d.labelled_per_batch}',
            )
    elif spec.name == 'image_folder':
        check_image_folder(spec.image_folder, spec.eval_splits, f'{key}.image_folder', problems)
    elif spec.name == 'text':
        check_text_files(spec.text, spec.eval_splits, f'{key}.text', problems, student.kind)
        if spec.text.tokenizer:
            _check_pretrained(spec.text.tokenizer, f'{key}.text.tokenizer', problems, 'tokenizer')
    elif spec.name == 'mds':
        _check_mds(spec, f'{key}.mds', problems, student)
    elif spec.name == 'glue':
        g = spec.glue
        if g.task not in GLUE_TASKS:
            problems.add(
                f'{key}.glue.task',
                f'unknown GLUE task {g.task!r}{nearest(g.task, GLUE_TASKS)} (known: {", ".join(GLUE_TASKS)})',
            )
        elif not g.folder:
            problems.add(f'{key}.glue.folder', f'required: the folder holding the GLUE {g.task} TSV files')
        else:
            missing = [path for path in glue_files(g.task, g.folder).values() if not os.path.isfile(path)]
            if missing:
                problems.add(
                    f'{key}.glue.folder',
                    f'the GLUE {g.task} files are not on this machine: no file at {" nor at ".join(missing)}. '
                    f'Nothing is downloaded: copy the task folder from the GLUE distribution there, or pass '
                    f'{key}.glue.folder=/path/to/{g.task.upper()}',
                )
        if g.tokenizer:
            _check_pretrained(g.tokenizer, f'{key}.glue.tokenizer', problems, 'tokenizer')
        elif student.kind != 'huggingface':
            problems.add(f'{key}.glue.tokenizer', 'required unless the student is a huggingface model (whose is used)')


def _check_taught(spec: TeacherSpec, key: str, problems: Problems) -> None:
    """Refuse a teacher built with random weights and left so: neither trained here nor loaded from anywhere."""
    if spec.train is not None or spec.checkpoint or spec.kind == 'huggingface' or spec.kind not in MODEL_KINDS:
        return  # a huggingface teacher's pretrained weights are checked when it is loaded (its task head)
    what = f'{spec.kind} {spec.name}' if spec.name else spec.kind
    problems.add(
        key,
        f'teacher {key.rsplit(".", 1)[-1]} ({what}) has nothing to teach: it is neither trained by this recipe nor '
        f'loaded from a checkpoint, so it would keep its random initial weights. Add {key}.train (e.g. '
        f'{key}.train.max_duration=10ep) to train it first, or {key}.checkpoint (the file of its trained weights)',
    )


def _check_teacher(spec: TeacherSpec, key: str, recipe: Recipe, modality: Optional[str], problems: Problems) -> None:
    _check_model(spec, key, modality, problems)
    if spec.train is None:
        return
    _check_time(spec.train.max_duration, f'{key}.train.max_duration', problems)
    if spec.train.optimizer is not None:
        _check_optimizer(spec.train.optimizer, f'{key}.train.optimizer', problems)
    _check_component(spec.train.scheduler, f'{key}.train.scheduler', problems, 'scheduler')
    if spec.train.data:
        try:
            teacher_data_spec(recipe.data, spec.train.data)
        except ValueError as e:
            problems.add(f'{key}.train.data', str(e))


def _check_distillation(recipe: Recipe, problems: Problems) -> None:
    d, key = recipe.distillation, 'distillation'
    known = sorted({*LOSSES, *LOSS_ALIASES})
    if canonical_loss_name(d.loss) is None:
        problems.add(f'{key}.loss', f'unknown loss {d.loss!r}{nearest(d.loss, known)} (known: {", ".join(known)})')
    _check_loss_options(d.loss, dict(d.loss_options), f'{key}.loss_options', problems)
    if not d.temperature > 0:
        problems.add(f'{key}.temperature', f'expected a number > 0, got {d.temperature}')
    for name in ('org_loss_weight', 'kd_loss_weight'):
        if getattr(d, name) < 0:
            problems.add(f'{key}.{name}', f'expected a number >= 0, got {getattr(d, name)}')
    _check_time(d.start, f'{key}.start', problems, allow_fraction=True)
    _check_time(d.end, f'{key}.end', problems, allow_fraction=True)
    n_teachers = len(recipe.teachers)
    if d.n_teachers_to_sample is not None and not 1 <= d.n_teachers_to_sample <= n_teachers:
        problems.add(
            f'{key}.n_teachers_to_sample',
            f'expected an integer from 1 to the number of teachers ({n_teachers}), got {d.n_teachers_to_sample}',
        )
    for name, schedule in d.schedules.items():
        if name not in _SCHEDULED:
            problems.add(
                f'{key}.schedules.{name}',
                f'cannot schedule {name!r}{nearest(name, _SCHEDULED)} (schedulable: {", ".join(_SCHEDULED)})',
            )
        if schedule.kind not in SCHEDULES:
            problems.add(
                f'{key}.schedules.{name}.kind',
                f'unknown schedule {schedule.kind!r}{nearest(schedule.kind, SCHEDULES)} '
                f'(known: {", ".join(SCHEDULES)})',
            )
        _check_time(schedule.start, f'{key}.schedules.{name}.start', problems, allow_fraction=True)
        _check_time(schedule.end, f'{key}.schedules.{name}.end', problems, allow_fraction=True)
    for i, pair in enumerate(d.feature_pairs):
        if pair['loss'] not in FEATURE_LOSSES:
            problems.add(
                f'{key}.feature_pairs.{i}.loss',
                f'unknown feature loss {pair["loss"]!r}{nearest(pair["loss"], FEATURE_LOSSES)} '
                f'(known: {", ".join(FEATURE_LOSSES)})',
            )
        else:
            _check_option(FeaturePair, pair, f'{key}.feature_pairs.{i}', problems)
        if not 0 <= pair['teacher_index'] < n_teachers:
            problems.add(
                f'{key}.feature_pairs.{i}.teacher_index',
                f'expected 0 to {n_teachers - 1}, got {pair["teacher_index"]}',
            )


def _check_option(option_class: type, arguments: dict[str, Any], key: str, problems: Problems) -> None:
    """Build an option section's object once, so that the class's own checks of its values name the section."""
    try:
        option_class(**arguments)
    except (TypeError, ValueError) as e:
        problems.add(key, str(e))


# The recipe key of each option of composer_kd.options.CONFLICTS that a recipe can set.
_RECIPE_OPTIONS = {
    'n_teachers_to_sample': 'distillation.n_teachers_to_sample',
    'feature_pairs': 'distillation.feature_pairs',
    'on_policy': 'distillation.on_policy',
    'tasks': 'distillation.tasks',
    'search': 'search',
}


def _check_combinations(recipe: Recipe, problems: Problems) -> None:
    """Refuse the options that do not combine, as :data:`composer_kd.options.CONFLICTS` lists them."""
    d = recipe.distillation
    given = given_options(
        n_teachers_to_sample=d.n_teachers_to_sample,
        feature_pairs=d.feature_pairs,
        on_policy=d.on_policy is not None,
        tasks=d.tasks,
        search=recipe.search is not None,
    )
    for conflict in conflicts_among(given):
        problems.add(
            _RECIPE_OPTIONS[conflict.first],
            f'cannot be combined with {_RECIPE_OPTIONS[conflict.second]}: {conflict.reason}',
        )


def _check_loss_options(name: str, options: dict, key: str, problems: Problems) -> None:
    """Build the loss once with its options, so that an unknown or bad option is named before anything runs."""
    if canonical_loss_name(name) is None or not options:
        return
    try:
        loss_from_name(name, None, **options)
    except (TypeError, ValueError) as e:
        problems.add(key, f'{name} refused {dict(options)}: {e}')


def _check_search(recipe: Recipe, problems: Problems) -> None:
    s, key = recipe.search, 'search'
    if s is None:
        return
    if recipe.data.name == 'mds':
        problems.add(
            key,
            'a search keeps the settings that score highest, and token sequences are scored by loss (lower is '
            'better): it is not available for data.name: mds; compare settings with separate runs',
        )
        return
    d = recipe.distillation
    known = sorted({*LOSSES, *LOSS_ALIASES})
    if not d.enabled:
        problems.add(key, 'distillation.enabled is false: there are no distillation settings to choose')
    searched = {
        'temperature': s.temperatures,
        'kd_loss_weight': s.kd_loss_weights,
        'org_loss_weight': s.org_loss_weights,
    }
    for name in d.schedules:
        if searched.get(name):
            problems.add(key, f'distillation.schedules.{name} and a searched {name} cannot both set it; drop one')
    for i, loss in enumerate(s.losses):
        if canonical_loss_name(loss.name) is None:
            problems.add(
                f'{key}.losses.{i}.name',
                f'unknown loss {loss.name!r}{nearest(loss.name, known)} (known: {", ".join(known)})',
            )
        _check_loss_options(loss.name, dict(loss.options), f'{key}.losses.{i}.options', problems)
    for i, value in enumerate(s.temperatures):
        if not value > 0:
            problems.add(f'{key}.temperatures.{i}', f'expected a number > 0, got {value}')
    for name in ('kd_loss_weights', 'org_loss_weights'):
        for i, value in enumerate(getattr(s, name)):
            if value < 0:
                problems.add(f'{key}.{name}.{i}', f'expected a number >= 0, got {value}')
    _check_time(s.max_duration, f'{key}.max_duration', problems)
    splits = list(recipe.data.eval_splits or [])
    if s.split.lower() == 'test':
        problems.add(f'{key}.split', 'settings are never chosen on the test split; choose on a validation split')
    elif recipe.data.eval_splits is not None and s.split not in splits:
        problems.add(f'{key}.split', f'{s.split!r} is not in data.eval_splits ({", ".join(splits)})')
    if recipe.data.eval_splits is None or len(splits) < 2:
        problems.add(
            'data.eval_splits',
            f'with a search, name the split chosen on ({s.split}) and one to report on, e.g. [{s.split}, test]',
        )


def _check_on_policy(recipe: Recipe, problems: Problems) -> None:
    spec, key = recipe.distillation.on_policy, 'distillation.on_policy'
    if spec is None:
        return
    _check_option(OnPolicy, spec, key, problems)
    # Every model kind a recipe builds is a classifier; none generates text.
    problems.add(
        key,
        f'needs a student that generates text (a Hugging Face decoder-only language model), and a recipe builds '
        f'a classifier (student.kind {recipe.student.kind!r}); use Distillation(on_policy=OnPolicy(...)) in '
        'Python with a causal language model (examples/onpolicy_distillation.py)',
    )


def _check_compression(recipe: Recipe, problems: Problems) -> None:
    qat, pruning, key = recipe.compression.qat, recipe.compression.pruning, 'compression'
    if qat is not None:
        engines = [e for e in torch.backends.quantized.supported_engines if e != 'none']
        if qat.backend not in QAT_BACKENDS:
            problems.add(
                f'{key}.qat.backend',
                f'unknown quantization backend {qat.backend!r}{nearest(qat.backend, QAT_BACKENDS)} '
                f'(known: {", ".join(QAT_BACKENDS)})',
            )
        elif qat.backend not in engines:
            problems.add(
                f'{key}.qat.backend',
                f'this PyTorch build has no {qat.backend} quantized engine (it has: {", ".join(engines)})',
            )
        if recipe.student.kind not in IMAGE_KINDS:
            problems.add(
                f'{key}.qat',
                f'quantization-aware training traces a ComposerClassifier student with torch.fx (kind '
                f'{", ".join(IMAGE_KINDS)}); student.kind is {recipe.student.kind!r}',
            )
        _check_time(qat.freeze_observers, f'{key}.qat.freeze_observers', problems, allow_fraction=True)
        _check_time(qat.freeze_bn_stats, f'{key}.qat.freeze_bn_stats', problems, allow_fraction=True)
    if pruning is not None:
        if not 0.0 <= pruning.amount < 1.0:
            problems.add(f'{key}.pruning.amount', f'expected a fraction in [0, 1), got {pruning.amount}')
        if pruning.modules is not None and not pruning.modules:
            problems.add(f'{key}.pruning.modules', 'an empty list prunes nothing; leave it out for the default layers')
        _check_time(pruning.start, f'{key}.pruning.start', problems, allow_fraction=True)
        _check_time(pruning.end, f'{key}.pruning.end', problems, allow_fraction=True)
        if pruning.end is not None and not any(p.startswith(f'{key}.pruning.') for p in problems):
            start, end = (parse_time(time_or_fraction(t), t) for t in (pruning.start, pruning.end))
            if start.unit == end.unit and end.value <= start.value:
                problems.add(f'{key}.pruning.end', f'{pruning.end!r} must come after start {pruning.start!r}')


def check_recipe(recipe: Recipe, *, teachers_given: bool = False) -> list[str]:
    """Every problem that would stop ``recipe`` from running, each starting with its dotted key.

    Checks model kinds and names (torchvision constructors, Hugging Face model types, pretrained models on disk),
    checkpoint and data files, dataset, loss, algorithm, logger, optimizer and scheduler names, quantization
    backends, time strings, and numbers' ranges; and that every teacher has something to teach: a teacher that is
    neither trained by the recipe (``train:``) nor loaded (``checkpoint:``, or a ``huggingface`` model's
    pretrained weights) is refused. Never downloads.

    Args:
        recipe (Recipe): A recipe as :func:`composer_kd.recipes.loader.load_recipe` returns it.
        teachers_given (bool, optional): Whether the run gets its teachers already trained (``build_run``'s
            ``teachers=``), so that how the recipe would make them does not matter. Default: ``False``.

    Returns:
        list[str]: The problems; empty when the recipe can run.
    """
    problems = Problems()
    modality = None
    if recipe.data.name in DATASETS:
        modality = 'text' if recipe.data.name in ('synthetic_text', 'glue', 'text') else 'image'
        modality = 'lm' if recipe.data.name == 'mds' else modality
    _check_model(recipe.student, 'student', modality, problems)
    if not recipe.teachers:
        problems.add('teachers', 'expected at least one teacher')
    for i, teacher in enumerate(recipe.teachers):
        _check_teacher(teacher, f'teachers.{i}', recipe, modality, problems)
        if not teachers_given:
            _check_taught(teacher, f'teachers.{i}', problems)
    _check_data(recipe.data, 'data', problems, recipe.student)
    _check_distillation(recipe, problems)
    _check_combinations(recipe, problems)
    _check_search(recipe, problems)
    _check_on_policy(recipe, problems)
    _check_compression(recipe, problems)

    check_tasks(recipe, problems)
    _check_optimizer(recipe.optimizer, 'optimizer', problems)
    _check_component(recipe.scheduler, 'scheduler', problems, 'scheduler')
    hidden_labels = recipe.data.name == 'digits' and recipe.data.digits.keep_unlabelled and recipe.data.digits.per_class
    for i, algorithm in enumerate(recipe.algorithms):
        _check_component(algorithm, f'algorithms.{i}', problems, 'algorithm')
        if hidden_labels and algorithm.name in _LABEL_MIXING:
            problems.add(
                f'algorithms.{i}.name',
                f'{algorithm.name} turns labels into distributions and cannot handle the hidden labels of '
                'data.digits.keep_unlabelled; drop one of the two',
            )
    for i, logger in enumerate(recipe.loggers):
        _check_component(logger, f'loggers.{i}', problems, 'logger')
    _check_time(recipe.max_duration, 'max_duration', problems)
    _check_time(recipe.eval_interval, 'eval_interval', problems)
    _check_time(recipe.save_interval, 'save_interval', problems)
    for key, message in run_folder_problems(recipe):
        problems.add(key, message)
    if recipe.precision is not None and recipe.precision not in PRECISIONS:
        problems.add(
            'precision',
            f'unknown precision {recipe.precision!r}{nearest(recipe.precision, PRECISIONS)} '
            f'(known: {", ".join(PRECISIONS)}, or null for the device default)',
        )
    if recipe.device is not None and recipe.device not in DEVICES:
        problems.add(
            'device',
            f'unknown device {recipe.device!r}{nearest(recipe.device, DEVICES)} '
            f'(known: {", ".join(DEVICES)}, or null to pick the accelerator if any)',
        )
    if recipe.device_train_microbatch_size is not None and recipe.device_train_microbatch_size < 1:
        problems.add(
            'device_train_microbatch_size', f'expected an integer >= 1, got {recipe.device_train_microbatch_size}'
        )
    return list(problems)
