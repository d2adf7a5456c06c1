"""A recipe run's folder (``save_folder``): what it holds, when a run may write into it, and how to resume it.

A run writes the student's checkpoints to ``<save_folder>/student/`` and those of each teacher it trains to
``<save_folder>/teacher-<i>/``. A folder that is not empty is refused, so that no run destroys an earlier one;
``overwrite: true`` replaces the run folders' checkpoints, and ``resume: true`` continues the run they hold.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Sequence
from typing import Optional

from composer_kd.recipes.schema import Recipe

__all__ = [
    'STUDENT_FOLDER',
    'clear_run_folder',
    'interrupted_message',
    'resume_command',
    'run_folder_problems',
    'teacher_folder',
]

#: The student's checkpoints, under the run's ``save_folder``.
STUDENT_FOLDER = 'student'

#: The file Composer keeps pointing at a trainer's latest checkpoint, in each checkpoint folder.
LATEST = 'latest-rank0.pt'


def teacher_folder(i: int) -> str:
    """The folder of teacher ``i``'s checkpoints under the run's ``save_folder``: ``'teacher-<i>'``."""
    return f'teacher-{i}'


def _local(folder: str) -> bool:
    return '://' not in folder


def run_folder_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """What stops ``recipe`` from writing into its ``save_folder``, as ``(key, message)`` pairs.

    A local ``save_folder`` that exists and holds anything is refused unless ``resume: true`` (continue that run)
    or ``overwrite: true`` (replace its checkpoints); ``resume`` needs a ``save_folder``, and not with ``overwrite``.

    Args:
        recipe (Recipe): The recipe.

    Returns:
        list[tuple[str, str]]: The problems; empty when the run may use its folder.

    Example:
        .. testcode::

            from composer_kd.recipes import load_recipe
            from composer_kd.recipes.run_folder import run_folder_problems

            assert run_folder_problems(load_recipe('digits', ['resume=true'])) == [
                ('resume', 'needs save_folder: the folder of the run to continue')
            ]
    """
    problems = []
    if recipe.resume and recipe.overwrite:
        problems.append(
            (
                'resume',
                'cannot be combined with overwrite: true (resume continues the run in save_folder, overwrite '
                'replaces it); drop one',
            )
        )
    if recipe.resume and not recipe.save_folder:
        problems.append(('resume', 'needs save_folder: the folder of the run to continue'))
    folder = recipe.save_folder
    if not folder or not _local(folder):
        return problems
    path = os.path.abspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        problems.append(('save_folder', f'{path} is a file, not a folder'))
    elif not recipe.resume and not recipe.overwrite and os.path.isdir(path) and os.listdir(path):
        entries = sorted(os.listdir(path))
        shown = ', '.join(entries[:4]) + (f' and {len(entries) - 4} more' if len(entries) > 4 else '')
        problems.append(
            (
                'save_folder',
                f'{path} is not empty ({shown}): it may hold an earlier run, whose checkpoints this run would '
                'replace. Choose another save_folder, set resume: true to continue the run it holds, or '
                'overwrite: true to replace its checkpoints',
            )
        )
    return problems


def clear_run_folder(recipe: Recipe) -> list[str]:
    """With ``overwrite: true``, remove the checkpoints of the run ``save_folder`` holds: its ``student/`` and
    ``teacher-<i>/`` folders (nothing else in it is touched).

    Args:
        recipe (Recipe): The recipe.

    Returns:
        list[str]: The folders removed.
    """
    folder = recipe.save_folder
    if not recipe.overwrite or not folder or not _local(folder) or not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        run_part = name == STUDENT_FOLDER or (name.startswith('teacher-') and name[len('teacher-') :].isdigit())
        if run_part and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def resume_command(recipe: str, overrides: Sequence[str], overwrite: bool) -> str:
    """The ``composer-kd train`` command that resumes a run started with ``recipe`` and ``overrides``.

    Args:
        recipe (str): The recipe as the command was given it (a file or a built-in name).
        overrides (Sequence[str]): Its ``key=value`` overrides.
        overwrite (bool): Whether the run had ``overwrite: true`` (which the command turns off).

    Returns:
        str: The command, run from the current directory (relative paths of the recipe stay valid).

    Example:
        .. testcode::

            from composer_kd.recipes.run_folder import resume_command

            command = resume_command('digits', ['save_folder=runs/a', 'overwrite=true'], overwrite=True)
            assert command.endswith('composer-kd train digits save_folder=runs/a overwrite=false resume=true')
    """
    kept = [o for o in overrides if not o.startswith(('resume=', 'overwrite='))]
    extra = ['overwrite=false'] if overwrite else []
    words = ['composer-kd', 'train', recipe, *kept, *extra, 'resume=true']
    return f'cd {shlex.quote(os.getcwd())} && ' + ' '.join(shlex.quote(w) for w in words)


def interrupted_message(recipe: Recipe, command: Optional[str] = None) -> str:
    """What an interrupted run tells: where its checkpoints are, and how to resume it.

    Args:
        recipe (Recipe): The recipe of the run.
        command (str, optional): The exact command that resumes it (see :func:`resume_command`). Default: the
            override to add.

    Returns:
        str: The message, one or more lines.
    """
    if not recipe.save_folder:
        return (
            'Interrupted: nothing was saved (the recipe has no save_folder). Set save_folder to keep checkpoints that '
            'a run can be resumed from.'
        )
    folder = recipe.save_folder if not _local(recipe.save_folder) else os.path.abspath(recipe.save_folder)
    found = []
    for name in [STUDENT_FOLDER, *(teacher_folder(i) for i in range(len(recipe.teachers)))]:
        latest = os.path.join(folder, name, LATEST)
        if _local(folder) and os.path.exists(latest):
            found.append(f'{name}/ (latest: {os.path.basename(os.path.realpath(latest))})')
    held = (', '.join(found) or 'no checkpoint yet') if _local(folder) else 'student/ and teacher-<i>/'
    how = command or 'run the same recipe again with the override resume=true'
    return f"Interrupted. The run's checkpoints are in {folder}: {held}. Resume it with:\n  {how}"
