"""Turning a checked recipe into Composer objects: models, data, ``Distillation`` and ordinary ``Trainer`` s.

Nothing is trained here. :func:`build_run` returns a :class:`~composer_kd.recipes.run.RecipeRun` holding the
teachers' trainers (for teachers the recipe trains first) and the student's trainer; every object is built,
and so every constructor's complaint is heard, before the first step of any fit. The pieces are built by
:mod:`~composer_kd.recipes.components` (algorithms, ``Distillation``, compression) and
:mod:`~composer_kd.recipes.trainers` (the trainers), whose names are importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from composer import Trainer
from composer.core import Callback
from composer.models import ComposerModel
from composer.utils import reproducibility

from composer_kd.models.rng import preserved_rng
from composer_kd.recipes.components import (
    build_compression,
    build_distillation,
    build_task_distillations,
)
from composer_kd.recipes.datasets import build_data, example_batch
from composer_kd.recipes.loader import RecipeError, teacher_data_spec
from composer_kd.recipes.models import build_model, check_model_takes, find_pretrained, input_hint
from composer_kd.recipes.quiet import quiet_libraries
from composer_kd.recipes.run import RecipeRun
from composer_kd.recipes.run_folder import teacher_folder
from composer_kd.recipes.schema import Recipe
from composer_kd.recipes.trainers import (
    LoggerFactory,
    build_student,
    build_student_alone,
    build_trainer,
    eval_splits,
    evaluate,
    no_loggers,
)
from composer_kd.recipes.validate import check_recipe
from composer_kd.run.reporting import evaluate_model

__all__ = [
    'LoggerFactory',
    'build_compression',
    'build_distillation',
    'build_task_distillations',
    'build_run',
    'build_student_alone',
    'build_trainer',
    'eval_splits',
    'evaluate',
    'evaluate_model',
    'teacher_data_spec',
]

# Seeds of the teachers' initializations are offset from the student's, so a teacher and a student of one
# architecture do not start from the same weights.
_TEACHER_SEED_OFFSET = 1000


def _student_tokenizer(recipe: Recipe) -> Optional[str]:
    return recipe.student.name if recipe.student.kind == 'huggingface' else None


def _check_tokenizers(recipe: Recipe, data) -> None:
    """Refuse a Hugging Face model whose own tokenizer would turn the data's texts into other token ids."""
    if data.tokenizer is None:
        return
    from transformers import AutoTokenizer

    train = data.train
    sample = train.columns['input_ids'][:64] if hasattr(train, 'columns') else None
    if sample is None:
        return
    ours = AutoTokenizer.from_pretrained(data.tokenizer, local_files_only=True)
    texts = ours.batch_decode(sample, skip_special_tokens=True)
    models = [('student', recipe.student), *((f'teachers.{i}', t) for i, t in enumerate(recipe.teachers))]
    for key, spec in models:
        if spec.kind != 'huggingface':
            continue
        directory, _ = find_pretrained(str(spec.name))
        if directory is None or os.path.realpath(directory) == os.path.realpath(data.tokenizer):
            continue
        try:
            theirs = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError):
            continue  # no tokenizer of its own: it reads the data's
        differ = [t for t in texts if ours(t)['input_ids'] != theirs(t)['input_ids']]
        if differ:
            raise RecipeError(
                'recipe',
                [
                    f'{key}.name: the tokenizer at {directory} splits the data differently from the one that '
                    f'tokenizes them ({data.tokenizer}): {len(differ)} of {len(texts)} sampled texts get other token '
                    f'ids (e.g. {differ[0][:60]!r}), so the model would read other words than the data hold. Use '
                    "models sharing one tokenizer, or set the data's tokenizer to this model's"
                ],
            )


def _check_token_data(recipe: Recipe, data, models: Sequence[tuple[str, ComposerModel]]) -> None:
    """For token sequences: every model's vocabulary covers the ids the data hold (in the first
    ``data.mds.check_samples`` sequences of each split), and its position embeddings the sequence length."""
    if data.task.modality != 'lm':
        return
    options = recipe.data.mds
    largest = {}
    for split, dataset in [(options.train_split, data.train), *data.splits.items()]:
        n = min(len(dataset), options.check_samples)
        largest[split] = max((int(dataset.token_ids(i).max(initial=0)) for i in range(n)), default=0)
    split, top = max(largest.items(), key=lambda item: item[1])
    problems = []
    if options.vocab_size is not None and top >= options.vocab_size:
        problems.append(
            f'data.mds.vocab_size: the data hold token id {top} (split {split!r}), beyond a vocabulary of '
            f'{options.vocab_size} ids'
        )
    for key, model in models:
        config = getattr(getattr(model, 'model', None), 'config', None)
        vocab = getattr(config, 'vocab_size', None)
        positions = getattr(config, 'n_positions', None) or getattr(config, 'max_position_embeddings', None)
        if vocab is not None and top >= vocab:
            problems.append(
                f'{key}: its vocabulary has {vocab} ids but the data hold token id {top} (split {split!r}); the '
                "data must be tokenized with this model's tokenizer (or set data.mds.vocab_size / "
                f'{key}.kwargs.vocab_size for a model built from a config)'
            )
        if positions is not None and options.max_seq_len > positions:
            problems.append(
                f'data.mds.max_seq_len: {options.max_seq_len} tokens, but {key} has {positions} positions; set '
                f'data.mds.max_seq_len: {positions} or less'
            )
    if problems:
        raise RecipeError('recipe', problems)


def build_run(
    recipe: Recipe,
    *,
    source: Optional[str] = None,
    loggers: Optional[LoggerFactory] = None,
    callbacks: Sequence[Callback] = (),
    teachers: Optional[Sequence[ComposerModel]] = None,
) -> RecipeRun:
    """Check ``recipe`` and build everything it describes, training nothing yet.

    Args:
        recipe (Recipe): The recipe, from :func:`~composer_kd.recipes.loader.load_recipe`.
        source (str, optional): The recipe's name or path, for messages. Default: its ``name``.
        loggers (Callable[[str], Sequence[LoggerDestination]], optional): Extra logger destinations for each
            trainer, by role (e.g. an ``InMemoryLogger`` per model to draw curves). The recipe's own ``loggers``
            go to the student's trainer.
        callbacks (Sequence[Callback]): Extra callbacks for the student's trainer.
        teachers (Sequence[ComposerModel], optional): Teachers already built and trained (e.g. by an earlier run
            of this recipe) to use instead of the recipe's; none of them is trained again.

    Returns:
        RecipeRun: The teachers' and the student's trainers; call ``fit()`` to train.

    Raises:
        RecipeError: If the recipe has any problem (every one is listed), before anything is built.
    """
    problems = check_recipe(recipe, teachers_given=teachers is not None)
    if problems:
        raise RecipeError(source or recipe.name, problems)
    try:
        with quiet_libraries():
            return _build_run(recipe, loggers or no_loggers, callbacks, teachers)
    except RecipeError as e:
        raise RecipeError(source or recipe.name, e.problems) from e


def _build_run(
    recipe: Recipe,
    loggers: LoggerFactory,
    callbacks: Sequence[Callback],
    given_teachers: Optional[Sequence[ComposerModel]],
) -> RecipeRun:
    data = build_data(recipe.data, recipe.seed, _student_tokenizer(recipe))
    _check_tokenizers(recipe, data)
    teachers = []
    for i, spec in enumerate(recipe.teachers):
        if given_teachers is not None:
            teachers.append(given_teachers[i])
            continue
        with preserved_rng():  # the teacher's own seed; the generators are given back as they were
            reproducibility.seed_all(recipe.seed + _TEACHER_SEED_OFFSET * (i + 1))
            teachers.append(build_model(spec, data.task, teacher_key=f'teachers.{i}'))
    reproducibility.seed_all(recipe.seed)  # as build_student seeds it: every student of the run starts alike
    student = build_model(recipe.student, data.task)
    _check_token_data(recipe, data, [*((f'teachers.{i}', t) for i, t in enumerate(teachers)), ('student', student)])
    # Every model takes one example batch before any trainer (or run folder) exists.
    batch = example_batch(data)
    for i, teacher in enumerate(teachers):
        check_model_takes(teacher, batch, f'teachers.{i}', f'teacher {i}', input_hint(recipe, recipe.teachers[i]))
    check_model_takes(student, batch, 'student', 'the student', input_hint(recipe, recipe.student))

    teacher_trainers: list[Optional[Trainer]] = []
    for i, (spec, teacher) in enumerate(zip(recipe.teachers, teachers, strict=True)):
        if given_teachers is not None or spec.train is None:
            teacher_trainers.append(None)
            continue
        teacher_data = data
        if spec.train.data:
            teacher_spec = teacher_data_spec(recipe.data, spec.train.data)
            teacher_data = build_data(teacher_spec, recipe.seed, _student_tokenizer(recipe))
            teacher_data.splits = data.splits  # evaluated on the student's splits, whatever it trained on
        teacher_trainers.append(
            build_trainer(
                recipe,
                teacher,
                teacher_data,
                max_duration=spec.train.max_duration,
                optimizer=spec.train.optimizer or recipe.optimizer,
                scheduler=spec.train.scheduler or recipe.scheduler,
                loggers=loggers(f'teacher {i}'),
                save_folder=os.path.join(recipe.save_folder, teacher_folder(i)) if recipe.save_folder else None,
                save_interval=spec.train.max_duration,
                key=f'teachers.{i}.train',
                run_name=f'{recipe.name}-teacher-{i}',
            )
        )

    if recipe.distillation.enabled:
        student, trainer = build_student(
            recipe, data, 'student (distilled)', teachers=teachers, loggers=loggers, callbacks=callbacks, model=student
        )
    else:
        student, trainer = build_student(
            recipe, data, 'student alone', loggers=loggers, callbacks=callbacks, model=student
        )
    return RecipeRun(
        recipe=recipe,
        data=data,
        student=student,
        teachers=teachers,
        teacher_trainers=teacher_trainers,
        trainer=trainer,
        loggers=loggers,
        callbacks=list(callbacks),
    )
