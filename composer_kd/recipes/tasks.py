"""Multi-task recipes: which heads each model has, which teachers teach each task, and the checks of both.

On multi-task data (``data.digits.tasks``) every model of a recipe gets a head per task it names (every task of
the data by default), and ``distillation.tasks`` distils each named task from the teachers with that head.
"""

from __future__ import annotations

import re

from composer_kd.losses import LOSS_ALIASES, LOSSES, canonical_loss_name
from composer_kd.recipes.data import DIGITS_TASKS
from composer_kd.recipes.loader import Problems, nearest
from composer_kd.recipes.models import MODEL_KINDS, MULTITASK_KINDS
from composer_kd.recipes.schema import ModelSpec, Recipe, TaskSpec

__all__ = ['check_tasks', 'data_tasks', 'model_tasks', 'task_teachers']

_TASK_NAME = re.compile(r'[A-Za-z0-9_-]+')


def data_tasks(recipe: Recipe) -> list[str]:
    """The tasks of the recipe's data (``data.digits.tasks``); empty for single-task data.

    Args:
        recipe (Recipe): The recipe.

    Returns:
        list[str]: The task names, in the data's order.

    Example:
        .. testcode::

            from composer_kd.recipes import load_recipe
            from composer_kd.recipes.tasks import data_tasks, model_tasks

            recipe = load_recipe('digits', ['data.digits.tasks=[digit,parity]', 'student.tasks=[parity]'])
            assert data_tasks(recipe) == ['digit', 'parity'] and model_tasks(recipe.student, recipe) == ['parity']
    """
    return list(recipe.data.digits.tasks) if recipe.data.name == 'digits' else []


def model_tasks(spec: ModelSpec, recipe: Recipe) -> list[str]:
    """The heads a model of the recipe has on multi-task data: its ``tasks``, else every task of the data.

    Args:
        spec (ModelSpec): A model section of the recipe (its student or a teacher).
        recipe (Recipe): The recipe.

    Returns:
        list[str]: The model's heads; empty on single-task data.
    """
    return list(spec.tasks) or data_tasks(recipe)


def task_teachers(recipe: Recipe, task: TaskSpec) -> list[int]:
    """The indices of a task's teachers: those it names, else every teacher with the head it reads.

    Args:
        recipe (Recipe): The recipe.
        task (TaskSpec): An entry of ``distillation.tasks``.

    Returns:
        list[int]: Indices into ``recipe.teachers``.
    """
    if task.teachers:
        return list(task.teachers)
    head = task.teacher_logits_key or task.student_logits_key or task.name
    return [i for i, spec in enumerate(recipe.teachers) if head in model_tasks(spec, recipe)]


def _check_model_heads(recipe: Recipe, problems: Problems) -> None:
    tasks = data_tasks(recipe)
    if recipe.data.name == 'digits':
        for i, name in enumerate(tasks):
            if name not in DIGITS_TASKS:
                problems.add(
                    f'data.digits.tasks.{i}',
                    f'unknown task {name!r}{nearest(name, DIGITS_TASKS)} (known: {", ".join(DIGITS_TASKS)})',
                )
            elif name in tasks[:i]:
                problems.add(f'data.digits.tasks.{i}', f'task {name!r} is listed twice')
    models = [('student', recipe.student), *((f'teachers.{i}', t) for i, t in enumerate(recipe.teachers))]
    for key, spec in models:
        if spec.tasks and not tasks:
            problems.add(f'{key}.tasks', 'needs multi-task data: name the tasks in data.digits.tasks')
            continue
        for j, name in enumerate(spec.tasks):
            if name not in tasks:
                problems.add(
                    f'{key}.tasks.{j}',
                    f'{name!r} is not a task of the data{nearest(name, tasks)} (data.digits.tasks: {", ".join(tasks)})',
                )
        if tasks and spec.kind in MODEL_KINDS and spec.kind not in MULTITASK_KINDS:
            problems.add(
                f'{key}.kind',
                f'multi-task data needs a model of kind {" or ".join(MULTITASK_KINDS)} (one head per task), '
                f'got {spec.kind!r}',
            )


def _check_task(recipe: Recipe, i: int, task: TaskSpec, student_heads: list[str], problems: Problems) -> None:
    key = f'distillation.tasks.{i}'
    if not _TASK_NAME.fullmatch(task.name):
        problems.add(f'{key}.name', f'expected letters, digits, _ and - only, got {task.name!r}')
    earlier = [t.name for t in recipe.distillation.tasks[:i]]
    if task.name in earlier:
        problems.add(
            f'{key}.name', f'task {task.name!r} is already distilled by distillation.tasks.{earlier.index(task.name)}'
        )
    student_head = task.student_logits_key or task.name
    if student_head not in student_heads:
        problems.add(
            f'{key}.{"student_logits_key" if task.student_logits_key else "name"}',
            f'the student has no head {student_head!r}{nearest(student_head, student_heads)} '
            f'(its heads: {", ".join(student_heads)})',
        )
    known = sorted({*LOSSES, *LOSS_ALIASES})
    if task.loss is not None and canonical_loss_name(task.loss) is None:
        problems.add(
            f'{key}.loss', f'unknown loss {task.loss!r}{nearest(task.loss, known)} (known: {", ".join(known)})'
        )
    if task.temperature is not None and not task.temperature > 0:
        problems.add(f'{key}.temperature', f'expected a number > 0, got {task.temperature}')
    if task.kd_loss_weight is not None and task.kd_loss_weight < 0:
        problems.add(f'{key}.kd_loss_weight', f'expected a number >= 0, got {task.kd_loss_weight}')
    teacher_head = task.teacher_logits_key or student_head
    n_teachers = len(recipe.teachers)
    for j, index in enumerate(task.teachers):
        if not 0 <= index < n_teachers:
            problems.add(f'{key}.teachers.{j}', f'expected a teacher index from 0 to {n_teachers - 1}, got {index}')
            continue
        heads = model_tasks(recipe.teachers[index], recipe)
        if teacher_head not in heads:
            problems.add(
                f'{key}.teachers.{j}',
                f'teacher {index} has no head {teacher_head!r} (its heads: {", ".join(heads)}); give it that task '
                f'in teachers.{index}.tasks, or read another head with teacher_logits_key',
            )
    if not task.teachers and not task_teachers(recipe, task):
        problems.add(f'{key}.teachers', f"no teacher has a head {teacher_head!r}: name the task's teachers by index")


def check_tasks(recipe: Recipe, problems: Problems) -> None:
    """Check the multi-task form: the data's tasks, the models' heads, and ``distillation.tasks`` against both.

    Args:
        recipe (Recipe): The recipe.
        problems (Problems): Where each problem found is added.

    Returns:
        None: The problems are added to ``problems``.

    Example:
        .. testcode::

            from composer_kd.recipes import load_recipe
            from composer_kd.recipes.loader import Problems
            from composer_kd.recipes.tasks import check_tasks

            problems = Problems()
            check_tasks(load_recipe('digits', ['data.digits.tasks=[digit,parity]']), problems)
            assert problems[0].startswith('distillation.tasks: required with multi-task data')
    """
    _check_model_heads(recipe, problems)
    d, tasks = recipe.distillation, data_tasks(recipe)
    if not d.tasks:
        if tasks and d.enabled:
            problems.add(
                'distillation.tasks',
                'required with multi-task data (data.digits.tasks): one entry per task to distil, e.g. '
                '[{name: digit, teachers: [0]}]',
            )
        return
    if not tasks:
        problems.add('distillation.tasks', 'needs multi-task data: name the tasks in data.digits.tasks')
        return
    for name in ('temperature', 'kd_loss_weight'):
        if name in d.schedules:
            problems.add(f'distillation.schedules.{name}', f"with distillation.tasks, set each task's {name}")
    student_heads = model_tasks(recipe.student, recipe)
    for i, task in enumerate(d.tasks):
        _check_task(recipe, i, task, student_heads, problems)
