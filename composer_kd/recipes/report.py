"""The end-of-run tables, at their former path: they live in :mod:`composer_kd.run.reporting`."""

from composer_kd.run.reporting import format_summary, format_table, percent

__all__ = ['format_summary', 'format_table', 'percent']
