"""Distillation from llm-foundry's YAML: the ``distillation`` algorithm and the ``teacher_signal`` dataloader that
llm-foundry's registries find through this package's entry points.

This package needs the ``llm`` extra (``pip install 'composer-kd[llm]'``: llm-foundry and MosaicML Streaming);
importing it loads neither, and each name below is imported from its module on first use.
"""

from composer_kd.lazy import lazy_exports

#: ``{name: module}`` of every name this package exports.
EXPORTS = {
    'FoundryDistillation': 'composer_kd.llm.foundry',
    'build_teacher': 'composer_kd.llm.foundry',
    'check_vocabularies': 'composer_kd.llm.foundry',
}

__all__ = sorted(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS, globals())
