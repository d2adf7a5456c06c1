"""Which teacher wrote a teacher signal: its fingerprint, recorded in ``teacher_signal.json`` when the signal is
written, read back, and checked against a teacher a user names."""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Optional

from torch import nn

from composer_kd.cache.fingerprint import hash_teacher
from composer_kd.models.sharding import unsharded_class

__all__ = ['check_signal_teacher', 'signal_teacher', 'teacher_fingerprint']


def teacher_fingerprint(teacher: nn.Module, tokenizer: Any = None) -> dict[str, Optional[str]]:
    """What identifies a teacher in ``teacher_signal.json``: ``weights`` (its class and a BLAKE2 hash of every
    tensor of its ``state_dict``, as the teacher cache hashes teachers), ``config`` (a hash of a Hugging Face
    config, without its path and library version; ``None`` without one) and ``tokenizer`` (a hash of a tokenizer's
    class and vocabulary; ``None`` when none is given).

    Every weight is read once, on the host: for a 70B teacher that is a pass over its 140 GB.

    Example:
        .. testcode::

            import torch
            from composer_kd.signal.identity import teacher_fingerprint

            teacher = torch.nn.Linear(3, 2)
            assert teacher_fingerprint(teacher) == teacher_fingerprint(teacher)
            assert teacher_fingerprint(teacher) != teacher_fingerprint(torch.nn.Linear(3, 2))
    """
    config = getattr(teacher, 'config', None) or getattr(getattr(teacher, 'model', None), 'config', None)
    config_hash = None
    if config is not None and hasattr(config, 'to_dict'):
        fields = {
            key: value
            for key, value in config.to_dict().items()
            if key not in ('_name_or_path', 'transformers_version', '_commit_hash')
        }
        config_hash = _digest(json.dumps(fields, sort_keys=True, default=str))
    tokenizer_hash = None
    if tokenizer is not None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, 'get_vocab') else tokenizer
        tokenizer_hash = _digest(type(tokenizer).__qualname__ + json.dumps(vocab, sort_keys=True, default=str))
    return {
        'weights': f'{unsharded_class(teacher).__qualname__}:{hash_teacher(teacher)}',
        'config': config_hash,
        'tokenizer': tokenizer_hash,
    }


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def signal_teacher(out: str, local_dir: Optional[str] = None) -> Optional[dict[str, Optional[str]]]:
    """The fingerprint (:func:`teacher_fingerprint`) of the teacher that wrote the signal at ``out`` (a folder, or
    an object-store URI with ``local_dir`` to fetch into); ``None`` if it records none."""
    from composer_kd.signal.shards import read_signal_settings

    settings = read_signal_settings(local_dir, out) if '://' in out else read_signal_settings(out)
    return None if settings is None else settings.get('teacher')


def check_signal_teacher(out: str, teacher: nn.Module, tokenizer: Any = None, local_dir: Optional[str] = None) -> bool:
    """Whether ``teacher`` (and ``tokenizer``, if given) is the one that wrote the signal at ``out``; warns, naming
    both fingerprints, when it is not or when the signal records no teacher.

    Example:
        .. testcode::

            import tempfile, warnings
            import torch
            from composer_kd.signal.identity import check_signal_teacher

            with warnings.catch_warnings(record=True):
                assert not check_signal_teacher(tempfile.mkdtemp(), torch.nn.Linear(3, 2))  # no signal there
    """
    recorded = signal_teacher(out, local_dir)
    named = teacher_fingerprint(teacher, tokenizer)
    if recorded is None:
        warnings.warn(
            f'The teacher signal at {out} records no teacher: cannot tell whether {named} wrote it.', stacklevel=2
        )
        return False
    differ = [key for key in named if (key != 'tokenizer' or tokenizer is not None) and recorded.get(key) != named[key]]
    if differ:
        warnings.warn(
            f'The teacher signal at {out} was written by another teacher than the one named: '
            + ', '.join(f'{key} {recorded.get(key)!r} recorded, {named[key]!r} named' for key in differ)
            + '.',
            stacklevel=2,
        )
        return False
    return True
