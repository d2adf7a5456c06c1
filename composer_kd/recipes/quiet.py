"""Third-party log lines a recipe's user cannot act on, moved to the debug log while a recipe is built and run.

Each is named by its logger and the start of its message (:data:`DEMOTED`); inside :func:`quiet_libraries` such a
record is not shown but logged again at ``DEBUG`` on the ``composer_kd.recipes`` logger, where
``logging.basicConfig(level=logging.DEBUG)`` shows it. Every other line, warnings included, is left alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ['DEMOTED', 'quiet_libraries']

_log = logging.getLogger('composer_kd.recipes')

#: ``(logger name, message start)`` of each demoted line; ``''`` is the root logger (``logging.warning``).
DEMOTED = (
    # A recipe's Hugging Face models have no tokenizer object: the data are tokenized already.
    ('composer.models.huggingface', 'The tokenizer was not provided'),
    # Streaming's writer and index merging, about its own staging folders.
    ('streaming.base.storage.upload', 'Directory '),
    ('', 'A temporary folder '),
    # A config built from a name has no loss_type; transformers picks the causal LM loss, which is the one meant.
    ('transformers.modeling_utils', '`loss_type=None` was set in the config'),
)


class _Demote(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.start):
            return True
        _log.debug('%s: %s', record.name or 'root', message)
        return False


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the block, the lines of :data:`DEMOTED` go to the debug log instead of the console.

    Example:
        .. testcode::

            import logging
            from composer_kd.recipes.quiet import quiet_libraries

            shown = []
            handler = logging.Handler()
            handler.emit = shown.append
            logger = logging.getLogger('composer.models.huggingface')
            logger.addHandler(handler)
            with quiet_libraries():
                logger.warning('The tokenizer was not provided. This means ...')
            logger.removeHandler(handler)
            assert shown == []
    """
    installed = []
    for name, start in DEMOTED:
        logger, demote = logging.getLogger(name or None), _Demote(start)
        logger.addFilter(demote)
        installed.append((logger, demote))
    try:
        yield
    finally:
        for logger, demote in installed:
            logger.removeFilter(demote)
