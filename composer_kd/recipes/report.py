"""Plain-text tables for the end of a run: readable in a terminal, a log file or a CI transcript alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from composer_kd.recipes.run import RunSummary

__all__ = ['format_summary', 'format_table', 'percent']


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns aligned with spaces, a rule under the headers; columns listed in ``right`` are right-aligned.

    Example:
        .. testcode::

            from composer_kd.recipes.report import format_table

            print(format_table(['model', 'accuracy'], [['teacher', '98.1%']], right=[1]))
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return '  '.join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    return '\n'.join([line(headers), '  '.join('-' * w for w in widths), *(line(r) for r in rows)])


def percent(value: Optional[float], digits: int = 2) -> str:
    """``0.9812`` as ``'98.12%'``; ``'-'`` for ``None``."""
    return '-' if value is None else f'{100 * value:.{digits}f}%'


def _seconds(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.1f} s'


def format_summary(summary: RunSummary) -> str:
    """The end-of-run summary of ``composer-kd train``: every model's size, metrics and time, and the ratio."""
    splits = list(dict.fromkeys(split for m in summary.models for split in m.metrics))
    metrics = list(
        dict.fromkeys((split, name) for m in summary.models for split in splits for name in m.metrics.get(split, {}))
    )
    headers = ['model', 'architecture', 'parameters', *(f'{split} {name}' for split, name in metrics), 'train time']
    rows = [
        [
            m.role,
            m.description,
            f'{m.parameters:,}',
            *(percent(m.metrics.get(split, {}).get(name)) for split, name in metrics),
            _seconds(m.train_seconds),
        ]
        for m in summary.models
    ]
    # A recipe's name, or the function that ran (distill()).
    title = summary.recipe if summary.recipe.endswith('()') else f'recipe {summary.recipe}'
    lines = [f'Summary of {title}', format_table(headers, rows, right=range(2, len(headers)))]
    ratios = summary.ratios or ({summary.metric: summary.ratio} if summary.ratio is not None else {})
    for metric, ratio in ratios.items():
        lines.append(
            f'distillation ratio (distilled - alone) / (teacher - alone) on {summary.split} {metric}: {ratio:.2f}'
        )
    teachers = [m for m in summary.models if m.role.startswith('teacher')]
    students = [m for m in summary.models if m.role.startswith('student')]
    if teachers and students and students[0].parameters:
        lines.append(
            f'the student has {teachers[0].parameters / students[0].parameters:.0f}x fewer parameters than teacher 0'
        )
    if summary.inference:
        speed = summary.inference
        lines.append(
            f'student inference speed-up over teacher 0: {speed["speedup"]:.1f}x '
            f'({speed["teacher_us_per_example"]:.2f} vs {speed["student_us_per_example"]:.2f} µs per example)'
        )
    for m in summary.models:
        if m.checkpoint:
            lines.append(f'{m.role} checkpoint: {m.checkpoint}')
    lines.extend(summary.notes)
    lines.append(f'wall time: {summary.wall_seconds:.1f} s')
    return '\n'.join(lines)
