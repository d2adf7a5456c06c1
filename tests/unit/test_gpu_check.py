"""``python -m benchmarks.gpu_check`` without a GPU: its arguments, its plan, the table it writes, how it reads
pytest's JUnit XML and each worker's output, how a section keeps to its budget, and its refusal to run without
CUDA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import fused_memory_gpu, gpu_check
from benchmarks.gpu_check import Done, Job, Row, Section

ROOT = Path(__file__).resolve().parents[2]


def test_sections_default_to_all_and_run_in_their_own_order():
    assert gpu_check.parse_args([]).sections == ['tests', 'fsdp', 'fused', 'overhead']
    args = gpu_check.parse_args(['--sections', 'overhead, fsdp,fsdp'])
    assert args.sections == ['fsdp', 'overhead']
    assert not args.dry_run and not args.rehearse and args.worker is None
    assert args.output_dir == ROOT / 'benchmarks' / 'results'
    assert gpu_check.parse_args(['--rehearse']).output_dir.name == 'gpu_check_rehearsal'
    assert gpu_check.parse_args(['--output-dir', 'x']).output_dir == Path('x')


@pytest.mark.parametrize('sections', ['cuda', 'tests,fsd', ','])
def test_an_unknown_section_is_refused_naming_the_choices(sections, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(['--sections', sections])
    assert exit_info.value.code == 2
    assert 'choose from tests, fsdp, fused, overhead' in capsys.readouterr().err


def test_budgets_keep_the_whole_check_under_eight_minutes():
    assert set(gpu_check.BUDGETS) == set(gpu_check.SECTIONS)
    assert sum(gpu_check.BUDGETS.values()) <= 8 * 60 - 30  # room for start-up and the report


def test_dry_run_prints_sections_budgets_and_commands_and_runs_nothing(tmp_path, capsys):
    assert gpu_check.main(['--dry-run', '--sections', 'fsdp,tests', '--output-dir', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    budgets = gpu_check.BUDGETS
    assert f'GPU check plan: 2 sections, {budgets["tests"] + budgets["fsdp"]:g} s of budgets in all' in out
    assert out.index(f'tests (budget {budgets["tests"]:g} s)') < out.index(f'fsdp (budget {budgets["fsdp"]:g} s)')
    assert 'fused (budget' not in out and 'overhead (budget' not in out
    assert '-m pytest -m gpu tests -q -p no:cacheprovider --junitxml ' in out
    lines = {line.split(':')[0].strip(): line for line in out.splitlines() if line.startswith('  FSDP-')}
    assert set(lines) == {'FSDP-1, plain', 'FSDP-1, fused', 'FSDP-2, plain', 'FSDP-2, fused'}
    assert 'FSDP_VERSION=2 RANK=0' in lines['FSDP-2, fused'] and 'WORLD_SIZE=1' in lines['FSDP-2, fused']
    assert lines['FSDP-2, fused'].endswith('--worker fsdp --device cuda --fsdp-version 2 --fused')
    assert lines['FSDP-1, plain'].endswith('--worker fsdp --device cuda --fsdp-version 1')
    assert not (tmp_path / 'out').exists()


def test_the_rehearsal_plan_runs_tiny_on_the_cpu_and_skips_fsdp_1(tmp_path):
    sections = gpu_check.plan(gpu_check.SECTIONS, rehearse=True, work_dir=tmp_path)
    jobs = {job.label: job for section in sections for job in section.jobs}
    assert jobs['FSDP-1, plain'].skip and jobs['FSDP-1, fused'].skip and not jobs['FSDP-2, fused'].skip
    for label in ('FSDP-2, fused', 'fused vs unfused', 'text: kd / (student + teacher)'):
        command = jobs[label].command
        assert command[command.index('--device') + 1] == 'cpu' and command[-1] == '--quick'
    output = gpu_check.describe(sections, tmp_path)
    assert 'FSDP-1, plain: skipped (FSDP version 1 needs CUDA: not rehearsed on the CPU)' in output


def test_markdown_table_exactly():
    rows = [
        Row('tests', 'gpu.test_gpu::test_a[fp32]', 'passed', '', 1.25),
        Row('fsdp', 'FSDP-2, fused', 'failed', 'exit 1: a | b\nnext line', 12.0, output='not in the table'),
        Row('fused', 'Liger fused linear JSD', 'not installed', 'liger_kernel is not installed'),
    ]
    assert gpu_check.markdown_table(rows) == (
        '| section | check | result | detail | seconds |\n'
        '| --- | --- | --- | --- | --- |\n'
        '| tests | gpu.test_gpu::test_a[fp32] | passed |  | 1.2 |\n'
        '| fsdp | FSDP-2, fused | failed | exit 1: a \\| b next line | 12.0 |\n'
        '| fused | Liger fused linear JSD | not installed | liger_kernel is not installed |  |\n'
    )
    assert (
        gpu_check.markdown_table([])
        == '| section | check | result | detail | seconds |\n| --- | --- | --- | --- | --- |\n'
    )


def test_exit_status_and_summary():
    passed = Row('a', 'x', 'passed')
    assert gpu_check.exit_status([passed, Row('a', 'y', 'not installed'), Row('a', 'z', 'skipped')]) == 0
    assert gpu_check.exit_status([passed, Row('b', 'y', 'timed out')]) == 1
    assert gpu_check.exit_status([Row('b', 'y', 'failed')]) == 1
    assert gpu_check.summary([passed, passed]) == '2 rows: 2 passed. Nothing failed or timed out.'
    text = gpu_check.summary([passed, Row('b', 'y', 'timed out')])
    assert text == '2 rows: 1 passed, 1 timed out. CHECK FAILED: b: y.'


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="5" time="3.1">
<testcase classname="tests.end_to_end.gpu.test_gpu" name="test_ok[fp32]" time="1.500" />
<testcase classname="tests.end_to_end.gpu.test_gpu" name="test_bad" time="0.250">
  <failure message="AssertionError: assert 1 == 2&#10;second line">traceback of test_bad</failure>
</testcase>
<testcase classname="tests.end_to_end.gpu.test_gpu" name="test_setup" time="0.010">
  <error message="failed on setup with &quot;RuntimeError: CUDA error&quot;">setup traceback</error>
</testcase>
<testcase classname="tests.end_to_end.gpu.test_gpu" name="test_skip" time="0.000">
  <skipped type="pytest.skip" message="needs a CUDA device">tests/end_to_end/gpu/test_gpu.py:27</skipped>
</testcase>
<testcase classname="tests.end_to_end.gpu.test_gpu" name="test_known" time="0.100">
  <skipped type="pytest.xfail" message="known" />
</testcase>
</testsuite></testsuites>
"""


def test_junit_rows_one_per_test_a_skip_fails_on_cuda():
    rows = gpu_check.junit_rows(JUNIT)
    prefix = 'end_to_end.gpu.test_gpu::'
    assert [(r.check.removeprefix(prefix), r.result, r.seconds) for r in rows] == [
        ('test_ok[fp32]', 'passed', 1.5),
        ('test_bad', 'failed', 0.25),
        ('test_setup', 'failed', 0.01),
        ('test_skip', 'failed', 0.0),
        ('test_known', 'passed', 0.1),
    ]
    assert all(r.section == 'tests' and r.check.startswith(prefix) for r in rows)
    assert rows[1].detail == 'failure: AssertionError: assert 1 == 2 second line'
    assert rows[1].output == 'traceback of test_bad'
    assert rows[2].detail == 'error: failed on setup with "RuntimeError: CUDA error"'
    assert rows[3].detail == 'skipped: needs a CUDA device (a skip fails the check on a CUDA machine)'
    assert rows[4].detail == 'expected failure: known'
    rehearsed = gpu_check.junit_rows(JUNIT, skipped_is_failure=False)
    assert (rehearsed[3].result, rehearsed[3].detail) == ('skipped', 'skipped: needs a CUDA device')


def test_reading_pytest_without_xml_without_tests_and_with_an_internal_error(tmp_path):
    xml = tmp_path / 'gpu-tests.xml'
    read = gpu_check.read_tests(xml, skipped_is_failure=True)
    [row] = read(Done(4, '', 'ERROR: file or directory not found: tests\n', 2.0))
    assert (row.result, row.detail) == (
        'failed',
        'pytest wrote no JUnit XML (exit 4): ERROR: file or directory not found: tests',
    )
    xml.write_text('<testsuites><testsuite tests="0" /></testsuites>')
    [row] = read(Done(5, '1146 deselected in 5.0s\n', '', 6.0))
    assert row.result == 'failed' and row.detail.startswith('no test marked gpu ran (pytest exit 5)')
    xml.write_text(JUNIT)
    rows = read(Done(3, '', 'INTERNALERROR> boom\n', 6.0))
    assert len(rows) == 6 and (rows[-1].result, rows[-1].detail) == (
        'failed',
        'pytest exited with 3: INTERNALERROR> boom',
    )
    assert len(read(Done(1, '', '', 6.0))) == 5


def _fsdp_output(version=2, losses=(6.3, 6.29, 6.31, 6.28), steps=4):
    result = {'device': 'cuda', 'fsdp_version': version, 'fsdp_enabled': True, 'steps': steps, 'losses': list(losses)}
    return 'warm-up line\n' + json.dumps(result) + '\n{not json, printed at exit}\n'


def test_reading_an_fsdp_run():
    read = gpu_check.read_fsdp('FSDP-2, fused', 2)
    [row] = read(Done(0, _fsdp_output(), 'a warning\n', 14.5))
    assert (row.check, row.result, row.seconds) == ('FSDP-2, fused', 'passed', 14.5)
    assert row.detail == '4 steps on cuda, loss finite (6.3, 6.29, 6.31, 6.28)'
    [row] = read(Done(0, _fsdp_output(losses=(6.3, float('nan'), 6.3, 6.3)), '', 1.0))
    assert row.result == 'failed' and row.detail.startswith('loss not finite; 4 steps on cuda, loss NOT finite')
    [row] = read(Done(0, _fsdp_output(version=1), '', 1.0))
    assert row.result == 'failed' and row.detail.startswith('ran with FSDP version 1')
    [row] = read(Done(0, _fsdp_output(steps=3, losses=(6.3,) * 3), '', 1.0))
    assert row.result == 'failed' and row.detail.startswith('3 steps and 3 losses, not 4')
    traceback = 'Traceback (most recent call last):\n  ...\n[rank0]: RuntimeError: NCCL error\n'
    [row] = read(Done(1, '', traceback, 3.0))
    assert (row.result, row.detail) == ('failed', 'exit 1: [rank0]: RuntimeError: NCCL error')


def _variant(name, peak_mib, ms, loss, chunk=None):
    return {
        'variant': name,
        'shape': {'tokens': 8192, 'hidden': 4096, 'vocab': 128256},
        'dtype': 'bfloat16',
        'extra_peak_bytes': peak_mib * 2**20,
        'median_seconds': ms / 1e3,
        'loss': loss,
        'chunk_size': chunk,
    }


def _fused_report(liger=None, installed=False, tried=(8192,), fused_loss=12.0):
    unfused, fused = _variant('unfused', 20000, 50.0, 12.0), _variant('fused', 1000, 55.0, fused_loss, 1024)
    ratios = {
        'extra peak memory, fused / unfused': 0.05,
        'step time, fused / unfused': 1.1,
        'loss relative difference': abs(fused_loss - 12.0) / 12.0,
    }
    report = {
        'device': 'cuda',
        'allocators': {'torch': {'unfused': unfused, 'fused': fused, 'ratios': ratios}},
        'tokens_tried': list(tried),
        'liger_installed': installed,
    }
    if liger is not None:
        report['liger'] = liger
    return json.dumps(report)


def test_reading_the_fused_benchmark():
    rows = gpu_check.read_fused(Done(0, _fused_report(liger={'variant': 'liger', 'skipped': 'x'}), '', 40.0))
    assert [(r.check, r.result) for r in rows] == [
        ('unfused, 8192 x 4096 x 128256, bfloat16', 'passed'),
        ('fused (chunk 1024), 8192 x 4096 x 128256, bfloat16', 'passed'),
        ('Liger fused linear JSD', 'not installed'),
    ]
    assert rows[0].detail == 'extra peak 20000 MiB, step 50.00 ms' and rows[0].seconds == 40.0
    assert rows[1].detail == (
        'extra peak 1000 MiB (0.050 of unfused), step 55.00 ms (1.100 x unfused), loss relative difference 0.0e+00'
    )
    liger = {'variant': 'liger', 'extra_peak_bytes': 500 * 2**20, 'median_seconds': 0.04, 'loss': 0.3}
    rows = gpu_check.read_fused(Done(0, _fused_report(liger, installed=True, tried=(8192, 4096)), '', 1.0))
    assert rows[0].detail.endswith('(did not fit at 8192 tokens)')
    assert (rows[2].result, rows[2].detail.split(' (')[0]) == ('passed', 'extra peak 500 MiB, step 40.00 ms')
    broken = {'variant': 'liger', 'skipped': 'liger_kernel does not import: no Triton'}
    rows = gpu_check.read_fused(Done(0, _fused_report(broken, installed=True), '', 1.0))
    assert (rows[2].result, rows[2].detail) == ('failed', 'liger_kernel does not import: no Triton')
    rows = gpu_check.read_fused(Done(0, _fused_report(fused_loss=13.0), '', 1.0))
    assert rows[1].result == 'failed' and rows[1].detail.endswith('loss relative difference 8.3e-02 (over 0.01)')
    [row] = gpu_check.read_fused(Done(1, '', 'torch.OutOfMemoryError: CUDA out of memory.\n', 9.0))
    assert (row.check, row.result) == ('fused vs unfused', 'failed') and 'out of memory' in row.detail


def test_the_fused_worker_tiny_on_the_cpu_gives_what_the_reader_reads():
    report = gpu_check.fused_worker('cpu', quick=True)
    assert report['tokens_tried'] == [64]
    rows = gpu_check.read_fused(Done(0, json.dumps(report), '', 1.0))
    assert [(r.check, r.result) for r in rows[:2]] == [
        ('unfused, 64 x 16 x 500, float32', 'passed'),
        ('fused (chunk 16), 64 x 16 x 500, float32', 'passed'),
    ]
    installed = importlib.util.find_spec('liger_kernel') is not None
    assert rows[2].result == ('skipped' if installed else 'not installed')  # Liger is measured on CUDA only


def test_the_fused_worker_halves_the_tokens_until_both_variants_fit(monkeypatch):
    def run(args):
        if args.tokens > 16:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory (simulated)')
        return {'device': 'cpu', 'tokens': args.tokens}

    monkeypatch.setattr(fused_memory_gpu, 'run', run)
    monkeypatch.setattr(gpu_check, 'MIN_TOKENS', 16)
    report = gpu_check.fused_worker('cpu', quick=True)
    assert report['tokens_tried'] == [64, 32, 16] and report['tokens'] == 16
    monkeypatch.setattr(gpu_check, 'MIN_TOKENS', 32)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gpu_check.fused_worker('cpu', quick=True)


def test_reading_the_overhead_benchmark():
    medians = {'kd_step': 0.008, 'student_step': 0.0049, 'teacher_forward': 0.002}
    ratios = {'kd / (student + teacher)': 1.157, 'plain kd / (plain student + teacher)': 1.161}
    result = {'median_seconds': medians, 'ratios': ratios, 'repeats': {'rounds': 10, 'steps_per_round': 5}}
    [row] = gpu_check.read_overhead('vision')(Done(0, json.dumps(result), '', 30.0))
    assert (row.check, row.result) == ('vision: kd / (student + teacher)', 'passed')
    assert row.detail == (
        '1.157 (medians: kd 8 ms, student 4.9 ms, teacher forward 2 ms; plain loop 1.161; 10 rounds x 5 steps)'
    )


def _python(code: str) -> list[str]:
    return [sys.executable, '-c', code]


def test_a_section_that_runs_out_of_its_budget_is_timed_out_not_hung():
    printed = Job('prints', _python('print(7)'), lambda done: [Row('', 'prints', 'passed', done.stdout.strip())])
    sleeper = Job('sleeps', _python('import time; time.sleep(60)'), lambda done: [])
    never = Job('never started', _python('print(1)'), lambda done: [Row('', 'never started', 'passed')])
    start = time.monotonic()
    rows = gpu_check.run_section(Section('fake', 3.0, [printed, sleeper, never]))
    assert time.monotonic() - start < 20
    assert [(r.section, r.check, r.result) for r in rows] == [
        ('fake', 'prints', 'passed'),
        ('fake', 'sleeps', 'timed out'),
        ('fake', 'never started', 'timed out'),
    ]
    assert rows[0].detail == '7'
    assert rows[1].detail == 'killed: the section budget of 3 s ran out' and 2.0 < rows[1].seconds < 15
    assert rows[2].detail == 'not started: the section budget of 3 s was spent' and rows[2].seconds is None


def test_a_kill_at_the_budget_reaches_what_the_command_started(tmp_path):
    marker = tmp_path / 'grandchild.pid'
    code = (
        'import subprocess, sys, time; '
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f'open({str(marker)!r}, "w").write(str(child.pid)); time.sleep(60)'
    )
    done = gpu_check.run_command(_python(code), timeout=3.0)
    assert done.timed_out and done.seconds < 15
    stat = Path(f'/proc/{marker.read_text()}/stat')
    for _ in range(50):  # killed with its group: gone, or a zombie that nothing has reaped yet
        if not stat.exists() or stat.read_text().rsplit(')', 1)[1].split()[0] in ('Z', 'X'):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f'{stat.parent.name} outlived its section')


def test_unreadable_output_and_skipped_jobs_become_rows():
    def broken(done):
        raise KeyError('losses')

    rows = gpu_check.run_section(
        Section(
            'fake',
            30.0,
            [
                Job('garbled', _python("print('no json'); raise SystemExit(0)"), broken),
                Job('not here', _python('raise SystemExit(1)'), broken, skip='needs CUDA'),
            ],
        )
    )
    assert [(r.check, r.result) for r in rows] == [('garbled', 'failed'), ('not here', 'skipped')]
    assert rows[0].detail == "exit 0: KeyError: 'losses'; no json" and rows[0].output == 'no json'
    assert rows[1].detail == 'needs CUDA'


def test_report_files_hold_the_table_versions_and_every_row(tmp_path):
    env = {
        'device': 'NVIDIA H100 80GB HBM3',
        'torch': '2.7.0+cu126',
        'cuda': '12.6',
        'composer': '0.32.1',
        'transformers': '4.51.3',
        'liger_kernel': 'not installed',
        'python': '3.11.7',
        'date': '2026-01-01 00:00 UTC',
    }
    rows = [
        Row('fused', 'fused (chunk 1024)', 'passed', 'd', 3.0),
        Row('fsdp', 'FSDP-1, plain', 'failed', 'e', 1.0, 'log'),
    ]
    markdown = gpu_check.write_report(tmp_path, 'gpu_check', env, rows, {'fsdp': 1.0, 'fused': 3.0}, rehearsal=False)
    assert (tmp_path / 'gpu_check.md').read_text() == markdown
    assert markdown.startswith('# GPU check\n\nDevice: NVIDIA H100 80GB HBM3. Versions: torch 2.7.0+cu126, cuda 12.6, ')
    budgets = gpu_check.BUDGETS
    assert 'Date: 2026-01-01 00:00 UTC.' in markdown
    assert f'fsdp 1 s of {budgets["fsdp"]:g}, fused 3 s of {budgets["fused"]:g}; 4 s in all' in markdown
    assert gpu_check.markdown_table(rows) in markdown
    assert markdown.endswith('CHECK FAILED: fsdp: FSDP-1, plain.\n')
    saved = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert saved['device'] == 'NVIDIA H100 80GB HBM3' and saved['exit_status'] == 1 and not saved['rehearsal']
    assert saved['rows'][1] == {
        'section': 'fsdp',
        'check': 'FSDP-1, plain',
        'result': 'failed',
        'detail': 'e',
        'seconds': 1.0,
        'output': 'log',
    }


def test_without_cuda_the_command_fails_loudly_and_writes_nothing(tmp_path):
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'PYTHONPATH': str(ROOT)}
    command = [sys.executable, '-m', 'benchmarks.gpu_check', '--output-dir', str(tmp_path / 'out')]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith('gpu_check: FAILED: no CUDA device found (torch ')
    assert 'nothing was run' in done.stderr and done.stdout == ''
    assert not (tmp_path / 'out').exists()
