"""Every check that needs a CUDA device, as one command that prints one table, in under 8 minutes.

    python -m benchmarks.gpu_check                           # all sections (``make gpu-check``)
    python -m benchmarks.gpu_check --sections fsdp,fused     # some of them
    python -m benchmarks.gpu_check --dry-run                 # the plan: sections, budgets, commands; runs nothing
    python -m benchmarks.gpu_check --rehearse                # the same plan on the CPU, tiny: checks the command

Sections, in this order, each with a time budget (a command still running when its section's budget is spent is
killed and reported as timed out, as are the section's commands not yet started):

``tests``
    ``pytest -m gpu tests`` in a subprocess, one row per test read from its JUnit XML. On a CUDA machine a skipped
    test is a failure of the check (an expected failure, ``xfail``, is not).
``fsdp``
    A few steps of ``Distillation`` on a tiny GPT-2 built from a config, under Composer's FSDP version 1 and
    version 2 (``parallelism_config={'fsdp': {...}}`` with ``FSDP_VERSION=2``), plain and
    ``Distillation(teacher, 'kl', fused=True)``, each in its own single-rank process (``RANK=0 WORLD_SIZE=1``).
``fused``
    :mod:`benchmarks.fused_memory_gpu`: extra peak memory and step time of the fused output layer and loss
    against the unfused ones at Liger-Kernel's shapes (bf16, tokens 8192, hidden 4096, vocabulary 128,256; the
    tokens halved until both fit), and Liger's fused linear JSD beside them where ``liger_kernel`` imports.
``overhead``
    The KD step / (student step + teacher forward) ratio of :mod:`benchmarks.overhead` for the vision and the
    text pair of :mod:`benchmarks.run`, each in its own process (the teacher-option variants timed too, the
    compiled teacher not).

Writes ``benchmarks/results/gpu_check.md`` and ``.json`` (device, versions, date, every row, and the end of the
output of whatever failed). Exit status: 0 when no row failed or timed out, 1 when one did, 2 when no CUDA device
(or no Composer) is found, in which case nothing is run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'

PASSED, FAILED, TIMED_OUT, SKIPPED, NOT_INSTALLED = 'passed', 'failed', 'timed out', 'skipped', 'not installed'
#: The results that fail the check.
FAILING = (FAILED, TIMED_OUT)

#: Seconds per section, 450 in all: the whole check, Python's start-up and the report included, stays under 8
#: minutes. Measured on a 2-core CPU, pytest imports the suite and collects it in about 10 s; each single-rank
#: FSDP process and each benchmark process spends most of its time importing Composer and Transformers.
BUDGETS = {'tests': 120.0, 'fsdp': 120.0, 'fused': 90.0, 'overhead': 120.0}
SECTIONS = tuple(BUDGETS)

#: Steps of each FSDP smoke run; batches of 8 rows of 32 tokens.
FSDP_STEPS = 4
#: The fused section halves the tokens until both variants fit, down to this many.
MIN_TOKENS = 256
#: The fused loss's value may differ from the unfused one's by this much (relative) in bf16 and still pass.
FUSED_LOSS_TOLERANCE = 1e-2
OVERHEAD_PAIRS = ('vision', 'text')
#: Warm-up steps, steps per round and rounds of each overhead variant (benchmarks/run.py's full counts).
OVERHEAD_COUNTS = {'warmup': 3, 'steps': 5, 'rounds': 10}
OVERHEAD_QUICK_COUNTS = {'warmup': 1, 'steps': 2, 'rounds': 2}
COLUMNS = ('section', 'check', 'result', 'detail', 'seconds')


@dataclass
class Row:
    """One line of the table; ``output`` (the end of a failed command's output) goes to the JSON report only."""

    section: str
    check: str
    result: str
    detail: str = ''
    seconds: Optional[float] = None
    output: str = ''


@dataclass
class Done:
    """A finished (or killed) command: ``returncode`` is ``None`` when it was killed at its section's budget."""

    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, chars: int = 3000) -> str:
        return (self.stdout + '\n' + self.stderr).strip()[-chars:]

    def last_line(self) -> str:
        """The last non-empty line of stderr (where Python writes its exception), else of stdout."""
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return _shorten(lines[-1])
        return ''

    def json(self) -> Any:
        """The JSON object a worker prints on a line of its own: the last such line of stdout."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith('{'):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        raise ValueError('the command printed no JSON object on stdout')


@dataclass
class Job:
    """One command of a section, and how its output becomes rows (``read`` gets the finished command). With
    ``skip`` (a reason) it is not run and its row says skipped."""

    label: str
    command: list[str]
    read: Callable[[Done], list[Row]]
    env: dict[str, str] = field(default_factory=dict)
    skip: str = ''


@dataclass
class Section:
    name: str
    budget_s: float
    jobs: list[Job]


def _shorten(text: Optional[str], limit: int = 200) -> str:
    text = ' '.join((text or '').split())
    return text if len(text) <= limit else text[: limit - 3] + '...'


# The table.


def _cell(value: Any) -> str:
    return ' '.join(str(value).split()).replace('|', '\\|')


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table: one line per row, ``|`` escaped, line breaks folded, seconds to 0.1 s."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + ' --- |' * len(COLUMNS)]
    for row in rows:
        seconds = '' if row.seconds is None else f'{row.seconds:.1f}'
        cells = (row.section, row.check, row.result, row.detail, seconds)
        lines.append('| ' + ' | '.join(_cell(cell) for cell in cells) + ' |')
    return '\n'.join(lines) + '\n'


def exit_status(rows: Sequence[Row]) -> int:
    return 1 if any(row.result in FAILING for row in rows) else 0


def summary(rows: Sequence[Row]) -> str:
    """How many rows had each result, and which failed or timed out."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.result] = counts.get(row.result, 0) + 1
    text = f'{len(rows)} rows: ' + ', '.join(f'{n} {result}' for result, n in counts.items()) + '.'
    failing = [f'{row.section}: {row.check}' for row in rows if row.result in FAILING]
    if failing:
        return f'{text} CHECK FAILED: {"; ".join(failing)}.'
    return f'{text} Nothing failed or timed out.'


# Running a section within its budget.


def _env(extra: dict[str, str]) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
    return {**os.environ, 'PYTHONPATH': path, 'PYTHONUNBUFFERED': '1', **extra}


def run_command(command: Sequence[str], timeout: float, env: Optional[dict[str, str]] = None) -> Done:
    """Run ``command`` from the repository root; past ``timeout`` seconds kill it and everything it started."""
    start = time.monotonic()
    process = subprocess.Popen(
        list(command),
        cwd=ROOT,
        env=_env(env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so that a kill reaches what it started
    )
    try:
        stdout, stderr = process.communicate(timeout=max(timeout, 0.0))
        returncode: Optional[int] = process.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a descendant that left the group still holds the pipes
            stdout, stderr = '', ''
        returncode = None
    return Done(returncode, stdout or '', stderr or '', time.monotonic() - start)


def run_section(section: Section) -> list[Row]:
    """Each of the section's commands in turn, each given what is left of the section's budget."""
    deadline = time.monotonic() + section.budget_s
    rows: list[Row] = []
    for job in section.jobs:
        left = deadline - time.monotonic()
        if job.skip:
            rows.append(Row(section.name, job.label, SKIPPED, job.skip))
            continue
        if left <= 0:
            detail = f'not started: the section budget of {section.budget_s:g} s was spent'
            rows.append(Row(section.name, job.label, TIMED_OUT, detail))
            continue
        done = run_command(job.command, left, job.env)
        if done.timed_out:
            detail = f'killed: the section budget of {section.budget_s:g} s ran out'
            rows.append(Row(section.name, job.label, TIMED_OUT, detail, done.seconds, done.tail()))
            continue
        try:
            job_rows = job.read(done)
        except Exception as error:  # output that could not be read is the command's failure, not the check's
            detail = f'exit {done.returncode}: {_shorten(f"{type(error).__name__}: {error}")}; {done.last_line()}'
            job_rows = [Row(section.name, job.label, FAILED, detail, done.seconds)]
        for row in job_rows:
            row.section = section.name
            if row.result in FAILING and not row.output:
                row.output = done.tail()
        rows += job_rows
    return rows


# Reading each section's output.


def junit_rows(xml_text: str, skipped_is_failure: bool = True) -> list[Row]:
    """One row per ``<testcase>`` of pytest's JUnit XML. A skip fails when ``skipped_is_failure`` (on a CUDA
    machine nothing marked ``gpu`` should skip); an expected failure (``xfail``) passes."""
    rows = []
    for case in ET.fromstring(xml_text).iter('testcase'):
        classname, name = case.get('classname', ''), case.get('name', '')
        check = f'{classname.removeprefix("tests.")}::{name}' if classname else name
        problems = [child for child in case if child.tag in ('failure', 'error')]
        skipped = case.find('skipped')
        output = ''
        if problems:
            problem = problems[0]
            result, detail = FAILED, f'{problem.tag}: {_shorten(problem.get("message") or problem.text)}'
            output = (problem.text or '')[-3000:]
        elif skipped is not None and skipped.get('type') == 'pytest.xfail':
            result, detail = PASSED, f'expected failure: {_shorten(skipped.get("message"))}'
        elif skipped is not None:
            result = FAILED if skipped_is_failure else SKIPPED
            detail = f'skipped: {_shorten(skipped.get("message"))}'
            if skipped_is_failure:
                detail += ' (a skip fails the check on a CUDA machine)'
        else:
            result, detail = PASSED, ''
        rows.append(Row('tests', check, result, detail, float(case.get('time') or 0.0), output))
    return rows


def read_tests(xml_path: Path, skipped_is_failure: bool) -> Callable[[Done], list[Row]]:
    def read(done: Done) -> list[Row]:
        if not xml_path.exists():
            detail = f'pytest wrote no JUnit XML (exit {done.returncode}): {done.last_line()}'
            return [Row('tests', 'pytest -m gpu', FAILED, detail, done.seconds)]
        rows = junit_rows(xml_path.read_text(), skipped_is_failure)
        if not rows:
            detail = f'no test marked gpu ran (pytest exit {done.returncode}): {done.last_line()}'
            rows.append(Row('tests', 'pytest -m gpu', FAILED, detail, done.seconds))
        elif done.returncode not in (0, 1):  # 1: some tests failed (their rows say so); else pytest itself did
            detail = f'pytest exited with {done.returncode}: {done.last_line()}'
            rows.append(Row('tests', 'pytest -m gpu', FAILED, detail, done.seconds))
        return rows

    return read


def _finite(values: Sequence[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def read_fsdp(label: str, version: int) -> Callable[[Done], list[Row]]:
    def read(done: Done) -> list[Row]:
        if done.returncode != 0:
            return [Row('fsdp', label, FAILED, f'exit {done.returncode}: {done.last_line()}', done.seconds)]
        result = done.json()
        losses = result['losses']
        problems = []
        if result['fsdp_version'] != version or not result['fsdp_enabled']:
            problems.append(f'ran with FSDP version {result["fsdp_version"]}, enabled {result["fsdp_enabled"]}')
        if result['steps'] != FSDP_STEPS or len(losses) != FSDP_STEPS:
            problems.append(f'{result["steps"]} steps and {len(losses)} losses, not {FSDP_STEPS}')
        if not _finite(losses):
            problems.append('loss not finite')
        shown = ', '.join(f'{v:.4g}' for v in losses)
        detail = f'{result["steps"]} steps on {result["device"]}, loss {"finite" if _finite(losses) else "NOT finite"}'
        detail += f' ({shown})'
        if problems:
            return [Row('fsdp', label, FAILED, '; '.join(problems) + f'; {detail}', done.seconds)]
        return [Row('fsdp', label, PASSED, detail, done.seconds)]

    return read


def read_fused(done: Done) -> list[Row]:
    if done.returncode != 0:
        return [Row('fused', 'fused vs unfused', FAILED, f'exit {done.returncode}: {done.last_line()}', done.seconds)]
    report = done.json()
    mib = 2**20
    results = report['allocators']['torch']
    unfused, fused, ratios = results['unfused'], results['fused'], results['ratios']
    shape = unfused['shape']
    where = f'{shape["tokens"]} x {shape["hidden"]} x {shape["vocab"]}, {unfused["dtype"]}'
    halved = report.get('tokens_tried', [])[:-1]
    note = f' (did not fit at {", ".join(map(str, halved))} tokens)' if halved else ''
    rows = [
        Row(
            'fused',
            f'unfused, {where}',
            PASSED if math.isfinite(unfused['loss']) else FAILED,
            f'extra peak {unfused["extra_peak_bytes"] / mib:.0f} MiB, step {unfused["median_seconds"] * 1e3:.2f} ms'
            + note,
            done.seconds,
        )
    ]
    memory, step = ratios['extra peak memory, fused / unfused'], ratios['step time, fused / unfused']
    difference = ratios['loss relative difference']
    close = math.isfinite(fused['loss']) and difference <= FUSED_LOSS_TOLERANCE
    detail = (
        f'extra peak {fused["extra_peak_bytes"] / mib:.0f} MiB ({memory:.3f} of unfused), step '
        f'{fused["median_seconds"] * 1e3:.2f} ms ({step:.3f} x unfused), loss relative difference {difference:.1e}'
    )
    if not close:
        detail += f' (over {FUSED_LOSS_TOLERANCE:g})'
    rows.append(Row('fused', f'fused (chunk {fused["chunk_size"]}), {where}', PASSED if close else FAILED, detail))
    liger = report.get('liger')
    if not report.get('liger_installed'):
        rows.append(Row('fused', 'Liger fused linear JSD', NOT_INSTALLED, 'liger_kernel is not installed'))
    elif liger is None:
        rows.append(Row('fused', 'Liger fused linear JSD', SKIPPED, f'measured on CUDA only ({report["device"]})'))
    elif 'skipped' in liger:
        rows.append(Row('fused', 'Liger fused linear JSD', FAILED, _shorten(liger['skipped'])))
    else:
        detail = (
            f'extra peak {liger["extra_peak_bytes"] / mib:.0f} MiB, step {liger["median_seconds"] * 1e3:.2f} ms '
            '(JSD at beta 0.5 without cross-entropy: beside ours, not the same work)'
        )
        rows.append(Row('fused', f'Liger fused linear JSD, {where}', PASSED, detail))
    return rows


def read_overhead(pair: str) -> Callable[[Done], list[Row]]:
    label = f'{pair}: kd / (student + teacher)'

    def read(done: Done) -> list[Row]:
        if done.returncode != 0:
            return [Row('overhead', label, FAILED, f'exit {done.returncode}: {done.last_line()}', done.seconds)]
        result = done.json()
        ratio, m = result['ratios']['kd / (student + teacher)'], result['median_seconds']
        reps = result['repeats']
        detail = (
            f'{ratio:.3f} (medians: kd {m["kd_step"] * 1e3:.3g} ms, student {m["student_step"] * 1e3:.3g} ms, '
            f'teacher forward {m["teacher_forward"] * 1e3:.3g} ms; plain loop '
            f'{result["ratios"]["plain kd / (plain student + teacher)"]:.3f}; {reps["rounds"]} rounds x '
            f'{reps["steps_per_round"]} steps)'
        )
        return [Row('overhead', label, PASSED if math.isfinite(ratio) else FAILED, detail, done.seconds)]

    return read


# The plan.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker_command(worker: str, device: str, quick: bool, *args: str) -> list[str]:
    command = [sys.executable, '-m', 'benchmarks.gpu_check', '--worker', worker, '--device', device, *args]
    return [*command, '--quick'] if quick else command


def plan(sections: Sequence[str], rehearse: bool, work_dir: Path) -> list[Section]:
    """The sections asked for, in the order of :data:`SECTIONS`, with their commands."""
    device = 'cpu' if rehearse else 'cuda'
    jobs: dict[str, list[Job]] = {}
    xml_path = work_dir / 'gpu-tests.xml'
    pytest = [sys.executable, '-m', 'pytest', '-m', 'gpu', 'tests', '-q', '-p', 'no:cacheprovider']
    jobs['tests'] = [Job('pytest -m gpu', [*pytest, '--junitxml', str(xml_path)], read_tests(xml_path, not rehearse))]
    jobs['fsdp'] = []
    for version in (1, 2):
        for fused in (False, True):
            label = f'FSDP-{version}, {"fused" if fused else "plain"}'
            args = ['--fsdp-version', str(version), *(['--fused'] if fused else [])]
            env = {
                'FSDP_VERSION': str(version),
                'RANK': '0',
                'LOCAL_RANK': '0',
                'NODE_RANK': '0',
                'WORLD_SIZE': '1',
                'LOCAL_WORLD_SIZE': '1',
                'MASTER_ADDR': '127.0.0.1',
                'MASTER_PORT': str(_free_port()),
            }
            command = _worker_command('fsdp', device, rehearse, *args)
            # Composer's FSDP version 1 needs CUDA; version 2 runs on a CPU too (gloo).
            skip = 'FSDP version 1 needs CUDA: not rehearsed on the CPU' if rehearse and version == 1 else ''
            if version == 1 and fused:  # refused by design; the gpu tests check the refusal
                skip = 'refused under FSDP version 1 (docs/fused.md; tests/end_to_end/gpu/test_fused_fsdp_gpu.py)'
            jobs['fsdp'].append(Job(label, command, read_fsdp(label, version), env, skip))
    jobs['fused'] = [Job('fused vs unfused', _worker_command('fused', device, rehearse), read_fused)]
    jobs['overhead'] = [
        Job(f'{pair}: kd / (student + teacher)', _worker_command('overhead', device, rehearse, '--pair', pair), read)
        for pair in OVERHEAD_PAIRS
        for read in [read_overhead(pair)]
    ]
    return [Section(name, BUDGETS[name], jobs[name]) for name in SECTIONS if name in sections]


def describe(sections: Sequence[Section], output_dir: Path) -> str:
    total = sum(section.budget_s for section in sections)
    lines = [f'GPU check plan: {len(sections)} sections, {total:g} s of budgets in all; results to {output_dir}.']
    for section in sections:
        lines += ['', f'{section.name} (budget {section.budget_s:g} s)']
        for job in section.jobs:
            env = ' '.join(f'{k}={shlex.quote(v)}' for k, v in job.env.items())
            command = f'skipped ({job.skip})' if job.skip else shlex.join(job.command)
            lines.append(f'  {job.label}: {(env + " ") if env and not job.skip else ""}{command}')
    return '\n'.join(lines)


# The report.


def environment(device: str) -> dict[str, Any]:
    import torch

    from benchmarks.run import _machine

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return 'not installed'

    return {
        'device': _machine(device),
        'torch': torch.__version__,
        'cuda': torch.version.cuda,
        'composer': version('mosaicml'),
        'transformers': version('transformers'),
        'liger_kernel': version('liger-kernel'),
        'python': platform.python_version(),
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    }


def report_markdown(env: dict[str, Any], rows: Sequence[Row], seconds: dict[str, float], rehearsal: bool) -> str:
    title = 'GPU check' + (' (a CPU rehearsal: tiny settings, nothing measured)' if rehearsal else '')
    versions = ', '.join(f'{k} {env[k]}' for k in ('torch', 'cuda', 'composer', 'transformers', 'liger_kernel'))
    spent = ', '.join(f'{name} {value:.0f} s of {BUDGETS[name]:g}' for name, value in seconds.items())
    spent += f'; {sum(seconds.values()):.0f} s in all'
    return '\n'.join(
        [
            f'# {title}',
            '',
            f'Device: {env["device"]}. Versions: {versions}; Python {env["python"]}. Date: {env["date"]}.',
            f'Time per section: {spent}.',
            '',
            markdown_table(rows),
            summary(rows),
            '',
        ]
    )


def write_report(
    output_dir: Path, stem: str, env: dict[str, Any], rows: Sequence[Row], seconds: dict[str, float], rehearsal: bool
) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(env, rows, seconds, rehearsal)
    (output_dir / f'{stem}.md').write_text(markdown)
    payload = {
        **env,
        'rehearsal': rehearsal,
        'budgets_s': {name: BUDGETS[name] for name in seconds},
        'seconds': seconds,
        'exit_status': exit_status(rows),
        'rows': [asdict(row) for row in rows],
    }
    (output_dir / f'{stem}.json').write_text(json.dumps(payload, indent=2) + '\n')
    return markdown


# The workers, each run in its own process by a section's command.


def fsdp_worker(version: int, fused: bool, device: str) -> dict[str, Any]:
    """A few steps of distillation from a 2-layer GPT-2 into a 1-layer one, the student under FSDP."""
    import torch
    from composer import Callback, Trainer
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader
    from transformers import GPT2Config, GPT2LMHeadModel

    from composer_kd import Distillation

    def gpt2(layers: int, width: int, seed: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=width, n_layer=layers, n_head=4))

    ids = torch.randint(0, 512, (FSDP_STEPS * 8, 32), generator=torch.Generator().manual_seed(0))
    rows = [{'input_ids': row, 'attention_mask': torch.ones_like(row), 'labels': row.clone()} for row in ids]
    losses: list[float] = []

    class Losses(Callback):
        def after_loss(self, state, logger):
            loss = state.loss['total'] if isinstance(state.loss, dict) else state.loss
            losses.append(float(loss.detach()))

    # FSDP_VERSION=2 in the environment makes Composer read the same key as an FSDP2Config.
    config = {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'PURE'} if version == 1 else {}
    if device == 'cuda':
        config['mixed_precision'] = 'PURE'
    trainer = Trainer(
        model=HuggingFaceModel(gpt2(1, 64, 1), use_logits=True),
        train_dataloader=DataLoader(rows, batch_size=8),
        max_duration=f'{FSDP_STEPS}ba',
        device='gpu' if device == 'cuda' else 'cpu',
        precision='amp_bf16' if device == 'cuda' else 'fp32',
        parallelism_config={'fsdp': config},
        algorithms=[Distillation(gpt2(2, 128, 0), 'kl', fused=fused)],
        callbacks=[Losses()],
        progress_bar=False,
        seed=17,
    )
    trainer.fit()
    return {
        'device': device,
        'fsdp_version': trainer.state.fsdp_config_version,
        'fsdp_enabled': trainer.state.fsdp_enabled,
        'steps': int(trainer.state.timestamp.batch),
        'losses': losses,
    }


def fused_worker(device: str, quick: bool) -> dict[str, Any]:
    """:func:`benchmarks.fused_memory_gpu.run` at its own shapes, the tokens halved until both variants fit."""
    import gc

    import torch

    from benchmarks import fused_memory_gpu

    args = fused_memory_gpu.parse_args(['--device', device, *(['--quick'] if quick else [])])
    tried = []
    while True:
        tried.append(args.tokens)
        try:
            report = fused_memory_gpu.run(args)
            break
        except torch.cuda.OutOfMemoryError:
            if args.tokens // 2 < MIN_TOKENS:
                raise
        gc.collect()
        torch.cuda.empty_cache()
        args.tokens //= 2
    return {**report, 'tokens_tried': tried, 'liger_installed': importlib.util.find_spec('liger_kernel') is not None}


def overhead_worker(pair_name: str, device: str, quick: bool) -> dict[str, Any]:
    """:func:`benchmarks.overhead.measure` for one of :mod:`benchmarks.run`'s pairs, without the compiled teacher."""
    import torch

    from benchmarks.overhead import measure
    from benchmarks.run import _model_pairs

    torch.manual_seed(0)
    pair = {pair.name: pair for pair in _model_pairs(quick)}[pair_name]
    counts = OVERHEAD_QUICK_COUNTS if quick else OVERHEAD_COUNTS
    result = measure(pair, device, compile_teacher=False, **counts)
    result.pop('samples')
    return result


def _worker(args: argparse.Namespace) -> None:
    if args.worker == 'fsdp':
        result = fsdp_worker(args.fsdp_version, args.fused, args.device)
    elif args.worker == 'fused':
        result = fused_worker(args.device, args.quick)
    else:
        result = overhead_worker(args.pair, args.device, args.quick)
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    # Out at once: the result is written, and tearing down a process group (NCCL's) at exit can hang.
    os._exit(0)


# The command.


def _sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f'unknown section(s) {unknown or [text]}: choose from {", ".join(SECTIONS)}')
    return [name for name in SECTIONS if name in names]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.gpu_check', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--sections',
        type=_sections,
        default=list(SECTIONS),
        help=f'comma-separated, run in the order {",".join(SECTIONS)} whatever order given (default: all)',
    )
    parser.add_argument('--dry-run', action='store_true', help='print the plan (sections, budgets, commands) only')
    parser.add_argument(
        '--rehearse',
        action='store_true',
        help='run the plan on the CPU in tiny settings, to check the command where there is no GPU (gpu tests then '
        'skip without failing); writes gpu_check_rehearsal.{md,json}, to a temporary folder unless --output-dir',
    )
    parser.add_argument('--output-dir', type=Path, default=None, help=f'default: {RESULTS.relative_to(ROOT)}')
    parser.add_argument('--worker', choices=('fsdp', 'fused', 'overhead'), help=argparse.SUPPRESS)
    parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda', help=argparse.SUPPRESS)
    parser.add_argument('--quick', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--fsdp-version', type=int, choices=(1, 2), default=1, help=argparse.SUPPRESS)
    parser.add_argument('--fused', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--pair', choices=OVERHEAD_PAIRS, default='vision', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.output_dir is None:
        rehearsal_dir = Path(tempfile.gettempdir()) / 'gpu_check_rehearsal'
        args.output_dir = rehearsal_dir if args.rehearse else RESULTS
    return args


def missing_requirement(rehearse: bool) -> Optional[str]:
    """Why the check cannot run here, or ``None``."""
    if importlib.util.find_spec('composer') is None:
        return "Composer is not installed: run it in the project's environment (`make gpu-check` makes one)."
    if rehearse:
        return None
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        visible = os.environ.get('CUDA_VISIBLE_DEVICES')
        return (
            f'no CUDA device found (torch {torch.__version__}, built for CUDA {torch.version.cuda}; '
            f'CUDA_VISIBLE_DEVICES={visible!r}). This check runs on a GPU; nothing was run. '
            '--dry-run prints its plan, --rehearse runs it on the CPU in tiny settings.'
        )
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args)  # exits the process
        return 0
    work_dir = Path(tempfile.gettempdir()) / f'gpu_check_{os.getpid()}'
    sections = plan(args.sections, args.rehearse, work_dir)
    if args.dry_run:
        print(describe(sections, args.output_dir))
        return 0
    problem = missing_requirement(args.rehearse)
    if problem:
        print(f'gpu_check: FAILED: {problem}', file=sys.stderr)
        return 2
    work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    for section in sections:
        print(f'{section.name}: {len(section.jobs)} command(s), budget {section.budget_s:g} s ...', flush=True)
        start = time.monotonic()
        section_rows = run_section(section)
        seconds[section.name] = time.monotonic() - start
        rows += section_rows
        for row in section_rows:
            print(f'  {row.result:13s} {row.check}', flush=True)
    stem = 'gpu_check_rehearsal' if args.rehearse else 'gpu_check'
    env = environment('cpu' if args.rehearse else 'cuda')
    markdown = write_report(args.output_dir, stem, env, rows, seconds, args.rehearse)
    print()
    print(markdown)
    print(f'written: {args.output_dir / (stem + ".md")}, {args.output_dir / (stem + ".json")}')
    return exit_status(rows)


if __name__ == '__main__':
    sys.exit(main())
