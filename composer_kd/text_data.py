"""BBC News by topic, read offline, at its former path: this name is :mod:`composer_kd.recipes.text_data` itself."""

import sys

from composer_kd.recipes import text_data

sys.modules[__name__] = text_data
