"""A recipe run's folder: a second run never destroys the first's (refused, or replaced on ``overwrite: true``), an
interrupted run says where its checkpoints are and the command that resumes it, and the resumed run ends with
the weights of an uninterrupted one without training its finished teacher again; no library chatter a user
cannot act on is printed."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import pytest
import torch
from composer import Callback, State
from composer.loggers import Logger

import composer_kd.recipes as recipes
from composer_kd.cli import main
from composer_kd.recipes import RecipeError, build_run, load_recipe
from composer_kd.recipes.quiet import quiet_libraries

TINY = [
    'progress_bar=false',
    'max_duration=6ba',
    'teachers.0.train.max_duration=4ba',
    'eval_interval=6ba',
    'save_interval=2ba',
    'baseline=false',
]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time (links by their target's)."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob('*'))
        if path.is_file()
    }


class InterruptAt(Callback):
    """Ctrl-C after the ``batch``-th training batch of the trainer it is given to."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            raise KeyboardInterrupt


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_into_a_used_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    folder = tmp_path / 'run'
    assert main(['train', 'digits', *TINY, f'save_folder={folder}']) == 0
    first = snapshot(folder)
    assert {'student/ep0-ba6-rank0.pt', 'teacher-0/ep0-ba4-rank0.pt'} <= set(first)
    capsys.readouterr()

    assert main(['train', 'digits', *TINY, f'save_folder={folder}']) == 2
    err = capsys.readouterr().err
    assert f'save_folder: {folder} is not empty (student, teacher-0)' in err and 'overwrite: true' in err
    assert snapshot(folder) == first  # byte for byte, not even touched

    # overwrite: true replaces the earlier run: none of its checkpoints is left beside the new ones.
    assert main(['train', 'digits', *TINY, 'max_duration=4ba', f'save_folder={folder}', 'overwrite=true']) == 0
    second = snapshot(folder)
    assert sorted(p for p in second if p.endswith('.pt') and not p.endswith('latest-rank0.pt')) == [
        'student/ep0-ba2-rank0.pt',
        'student/ep0-ba4-rank0.pt',
        'teacher-0/ep0-ba4-rank0.pt',
    ]
    assert all(second[p][1] > first[p][1] for p in second if p in first)


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, capsys):
    reference = build_run(load_recipe('digits', [*TINY, f'save_folder={tmp_path / "reference"}']))
    reference.fit()
    expected = weights(reference.student)
    capsys.readouterr()

    overrides = [*TINY, f'save_folder={tmp_path / "run"}']
    with pytest.raises(KeyboardInterrupt):
        build_run(load_recipe('digits', overrides), callbacks=[InterruptAt(3)]).fit()
    err = capsys.readouterr().err
    assert f"The run's checkpoints are in {tmp_path / 'run'}: student/ (latest: ep0-ba2-rank0.pt)" in err
    assert 'teacher-0/ (latest: ep0-ba4-rank0.pt)' in err and 'resume=true' in err
    interrupted = snapshot(tmp_path / 'run')

    # Interrupted again, after its next checkpoint: nothing the first attempt wrote is changed.
    with pytest.raises(KeyboardInterrupt):
        build_run(load_recipe('digits', [*overrides, 'resume=true']), callbacks=[InterruptAt(5)]).fit()
    again = snapshot(tmp_path / 'run')
    assert {p: again[p] for p in interrupted if not p.endswith('latest-rank0.pt')} == {
        p: v for p, v in interrupted.items() if not p.endswith('latest-rank0.pt')
    }
    assert 'student/ep0-ba4-rank0.pt' in again

    resumed = build_run(load_recipe('digits', [*overrides, 'resume=true']))
    assert int(resumed.trainer.state.timestamp.batch) == 4
    resumed.fit()
    assert 'Teacher 0: its training finished' in capsys.readouterr().out
    assert resumed.teacher_seconds == [0.0]
    assert snapshot(tmp_path / 'run')['teacher-0/ep0-ba4-rank0.pt'] == interrupted['teacher-0/ep0-ba4-rank0.pt']
    assert same_weights(weights(resumed.student), expected)

    # A run whose student had finished (stopped while being evaluated) is evaluated again, nothing trained.
    done = snapshot(tmp_path / 'reference')
    again = build_run(load_recipe('digits', [*TINY, f'save_folder={tmp_path / "reference"}', 'resume=true']))
    summary = again.fit()
    assert 'The student: its training finished' in capsys.readouterr().out
    assert same_weights(weights(again.student), expected) and summary.value('student (distilled)') is not None
    assert snapshot(tmp_path / 'reference') == done


def test_the_command_printed_on_interruption_resumes_the_run(tmp_path, capsys, monkeypatch):
    build = recipes.build_run
    calls = []

    def interrupted_once(recipe, **kwargs):
        calls.append(recipe)
        return build(recipe, **kwargs, callbacks=[InterruptAt(3)] if len(calls) == 1 else [])

    monkeypatch.setattr(recipes, 'build_run', interrupted_once)
    folder = tmp_path / 'run'
    assert main(['train', 'digits', *TINY, f'save_folder={folder}', 'overwrite=true']) == 130
    err = capsys.readouterr().err
    command = err.split('Resume it with:\n')[1].strip()
    cd, _, resume = command.partition(' && ')
    assert shlex.split(cd) == ['cd', os.getcwd()]
    words = shlex.split(resume)
    assert words[:3] == ['composer-kd', 'train', 'digits'] and words[-2:] == ['overwrite=false', 'resume=true']
    checkpoints = snapshot(folder)

    assert main(words[1:]) == 0
    out = capsys.readouterr().out
    assert 'Teacher 0: its training finished' in out and 'student (distilled)' in out
    assert calls[-1].resume and not calls[-1].overwrite
    assert snapshot(folder)['student/ep0-ba2-rank0.pt'] == checkpoints['student/ep0-ba2-rank0.pt']
    assert 'student/ep0-ba6-rank0.pt' in snapshot(folder)


def test_resume_needs_a_folder_and_does_not_combine_with_overwrite(tmp_path):
    with pytest.raises(RecipeError) as refused:
        build_run(load_recipe('digits', [*TINY, 'resume=true']))
    assert 'resume: needs save_folder' in str(refused.value)
    with pytest.raises(RecipeError) as refused:
        build_run(load_recipe('digits', [*TINY, f'save_folder={tmp_path}', 'resume=true', 'overwrite=true']))
    assert 'resume: cannot be combined with overwrite: true' in str(refused.value)


NOISE = (
    'The tokenizer was not provided',
    'exists and not empty',
    'A temporary folder',
    'was set in the config but it is unrecognised',
)


def test_a_recipe_run_from_python_prints_no_library_chatter(tmp_path, capsys, caplog):
    for name in (None, 'composer', 'transformers'):  # as a Python program leaves them (the command quiets them)
        caplog.set_level(logging.DEBUG, logger=name)
    run = build_run(
        load_recipe(
            'bert_synthetic',
            [
                'progress_bar=false',
                'max_duration=2ba',
                'teachers.0.train.max_duration=2ba',
                'eval_interval=2ba',
                'baseline=false',
                'data.synthetic_text.n_train=64',
                'data.synthetic_text.n_val=32',
            ],
        )
    )
    run.fit()
    out, err = capsys.readouterr()
    shown = [r.getMessage() for r in caplog.records if r.name != 'composer_kd.recipes' and r.levelno >= logging.INFO]
    for phrase in NOISE:
        assert not any(phrase in line for line in [*out.splitlines(), *err.splitlines(), *shown])
    debug = [r.getMessage() for r in caplog.records if r.name == 'composer_kd.recipes']
    assert any('The tokenizer was not provided' in line for line in debug)  # in the debug log, not lost


def test_streaming_staging_messages_go_to_the_debug_log(tmp_path, caplog):
    from streaming import MDSWriter
    from streaming.base.storage.upload import CloudUploader
    from streaming.base.util import merge_index

    with MDSWriter(out=str(tmp_path / 'out' / 'part'), columns={'x': 'int'}) as writer:
        writer.write({'x': 1})
    caplog.set_level(logging.DEBUG)
    with quiet_libraries():
        CloudUploader.get(str(tmp_path / 'out'), keep_local=True, exist_ok=True)
        merge_index([str(tmp_path / 'out' / 'part' / 'index.json')], str(tmp_path / 'out'), keep_local=True)
    shown = [r.getMessage() for r in caplog.records if r.name != 'composer_kd.recipes']
    assert not any(phrase in line for line in shown for phrase in NOISE)
    debug = ' '.join(r.getMessage() for r in caplog.records if r.name == 'composer_kd.recipes')
    assert 'exists and not empty' in debug and 'A temporary folder' in debug


@pytest.mark.parametrize(
    'override, expected',
    [
        ('temperature=2', "temperature: unknown key; did you mean 'distillation.temperature' or "),
        ('lr=0.1', "lr: unknown key; did you mean 'optimizer.lr' or 'teachers.0.train.optimizer.lr'?"),
        ('per_class=3', "per_class: unknown key; did you mean 'data.digits.per_class'?"),
        (
            'distillation..temperature=2',
            "the key 'distillation..temperature' has an empty part between dots; did you mean "
            "'distillation.temperature'?",
        ),
    ],
)
def test_an_unknown_key_is_told_where_it_belongs(override, expected):
    with pytest.raises(RecipeError) as refused:
        load_recipe('digits', [override])
    assert expected in str(refused.value)
    assert ': unknown key (the keys' not in str(refused.value)
