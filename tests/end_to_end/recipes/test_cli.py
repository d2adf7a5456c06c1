"""The ``composer-kd`` command: help on every subcommand, recipe listing, training with a summary, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from composer_kd.cli import main

TINY = ['progress_bar=false', 'max_duration=4ba', 'teachers.0.train.max_duration=4ba', 'eval_interval=2ba']


def run_main(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    'argv, phrases',
    [
        ([], ['{demo,train,recipes,teacher-signal}', 'demo', 'train', 'recipes', 'teacher-signal']),
        (['demo'], ['--output-dir', '--seeds', '--sweep', 'key=value', 'report.json', 'accuracy.png']),
        (
            ['train'],
            ['recipe', 'key=value', '--dry-run', '--summary-json', 'distillation.temperature=2', 'resume=true'],
        ),
        (['recipes'], ['name', 'List the recipes']),
        (['teacher-signal'], ['--teacher', '--tokens', '--out', '--k', '--dtype', 'resume']),
    ],
)
def test_help_on_every_command(argv, phrases, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, '--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: composer-kd')
    for phrase in phrases:
        assert phrase in out


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), 'composer-kd')
    result = subprocess.run([script, 'recipes'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:2] == ['bert_synthetic', 'NLP:']


def test_recipes_lists_each_built_in_recipe_on_one_line(capsys):
    code, out, _ = run_main(['recipes'], capsys)
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ['bert_synthetic', 'digits', 'function_matching', 'glue_qnli']
    assert 'Vision:' in lines[1] and 'MixUp' in lines[2] and 'GLUE QNLI' in lines[3]


def test_recipes_prints_one_recipe(capsys):
    code, out, _ = run_main(['recipes', 'glue_qnli'], capsys)
    assert code == 0
    assert 'hard_label_weight' in out and 'kd_loss_weight: 0.2' in out
    code, _, err = run_main(['recipes', 'no_such'], capsys)
    assert code == 2 and 'no built-in recipe named' in err


def test_train_dry_run_checks_and_builds_but_trains_nothing(capsys):
    # capsys's stand-in for stderr has no file descriptor, which Composer's progress bar asks for.
    code, out, err = run_main(
        ['train', 'digits', '--dry-run', 'distillation.temperature=2', 'progress_bar=false'], capsys
    )
    assert code == 0, err
    assert 'Recipe digits: teacher 0 trained first; student distilled, then the student alone' in out
    assert 'nothing was trained' in out


def test_train_runs_a_recipe_and_prints_a_summary(tmp_path, capsys):
    summary_path = tmp_path / 'summary.json'
    code, out, err = run_main(['train', 'digits', *TINY, f'--summary-json={summary_path}'], capsys)
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    assert [m['role'] for m in summary['models']] == ['teacher 0', 'student (distilled)', 'student alone']
    # The printed table carries the same numbers as the JSON.
    for model in summary['models']:
        accuracy = model['metrics']['val']['MulticlassAccuracy']
        assert f'{100 * accuracy:.2f}%' in out
        assert f'{model["parameters"]:,}' in out
    assert (
        f'distillation ratio (distilled - alone) / (teacher - alone) on val MulticlassAccuracy: {summary["ratio"]:.2f}'
        in out
    )
    assert 'wall time:' in out
    assert 'command wall time:' in out and '(reading, checking and building the recipe included)' in out


def test_progress_bars_are_announced_by_the_model_they_train(capfd):
    code = main(['train', 'digits', *[o for o in TINY if o != 'progress_bar=false']])
    out, err = capfd.readouterr()
    assert code == 0, err
    said = [line for line in out.splitlines() if line.startswith('Training ')]
    assert said == ['Training teacher 0:', 'Training student (distilled):', 'Training student alone:']


def test_train_refuses_a_bad_recipe_before_training(tmp_path, capsys):
    recipe = tmp_path / 'bad.yaml'
    recipe.write_text(
        'student: {kind: mlp, hiden: [8]}\nteachers: [{kind: cnn}]\ndata: {name: digits, batch_size: x}\n'
    )
    code, out, err = run_main(['train', str(recipe)], capsys)
    assert code == 2 and out == ''
    assert f'Recipe {recipe} cannot run (2 problems; nothing was trained)' in err
    assert "student.hiden: unknown key; did you mean 'student.hidden'?" in err
    assert "data.batch_size: expected an integer, got 'x' (a string)" in err


def test_train_glue_without_local_files_lists_what_is_missing(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(['train', 'glue_qnli', f'data.glue.folder={tmp_path}/QNLI'], capsys)
    assert code == 2
    assert 'student.name:' in err and 'teachers.0.name:' in err and 'Nothing is downloaded' in err
    assert f'no file at {tmp_path}/QNLI/train.tsv nor at {tmp_path}/QNLI/dev.tsv' in err
