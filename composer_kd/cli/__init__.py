"""The ``composer-kd`` command: recipes, the demo and the teacher-signal writer."""

from composer_kd.cli.main import main

__all__ = ['main']
