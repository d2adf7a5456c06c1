"""Teacher checkpoints: reading a Composer checkpoint or a ``state_dict`` file from any path or URI Composer reads,
and loading its weights into a teacher, checked key by key and shape by shape before anything is copied."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from composer.utils import get_file
from torch import nn

__all__ = ['align_state_dict_keys', 'load_teacher_checkpoint']

# How many offending keys an error message shows; a full list for a mismatched model would be thousands.
_KEYS_SHOWN = 5


def _read_checkpoint_file(path: str) -> Any:
    """Read a checkpoint through Composer's ``get_file``, so a path may be local or any URI Composer reads."""
    if os.path.isdir(path):
        raise IsADirectoryError(
            f'Teacher checkpoint {path!r} is a directory; give the checkpoint file inside it (a Composer checkpoint '
            'such as ep1.pt, or a state_dict saved with torch.save).'
        )
    with tempfile.TemporaryDirectory() as tmpdir:
        local_copy = os.path.join(tmpdir, os.path.basename(path.rstrip('/')) or 'checkpoint')
        try:
            get_file(path, local_copy, progress_bar=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f'Teacher checkpoint not found: {path!r}.') from e
        try:
            try:
                return torch.load(local_copy, map_location='cpu', weights_only=True)
            except pickle.UnpicklingError:
                # Composer checkpoints carry non-tensor state (timestamps, RNG states, metadata) that the
                # weights-only unpickler refuses; Composer itself loads its checkpoints this way.
                return torch.load(local_copy, map_location='cpu', weights_only=False)
        except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError) as e:
            # A text or other non-PyTorch file reaches the legacy unpickler, which fails with a bare KeyError.
            raise ValueError(
                f'Teacher checkpoint {path!r} could not be read (truncated or not a PyTorch checkpoint): '
                f'{type(e).__name__}: {e}'
            ) from e


def _model_weights(checkpoint: Any, path: str) -> Mapping[str, torch.Tensor]:
    """The model weights inside a Composer checkpoint or a plain ``state_dict`` file."""
    if isinstance(checkpoint, Mapping):
        state = checkpoint.get('state')
        if isinstance(state, Mapping) and isinstance(state.get('model'), Mapping):
            return state['model']  # written by Composer's Trainer
        for key in ('state_dict', 'model_state_dict', 'model'):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise ValueError(
        f'Teacher checkpoint {path!r} holds no model weights: expected a Composer checkpoint '
        "(weights under ['state']['model']) or a state_dict of tensors."
    )


def _shared_prefixes(keys: Sequence[str]) -> list[str]:
    """Dotted prefixes (up to two levels) carried by at least half the keys: wrapper names such as ``model.``."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split('.')
        for depth in (1, 2):
            if len(parts) > depth:
                prefix = '.'.join(parts[:depth]) + '.'
                counts[prefix] = counts.get(prefix, 0) + 1
    return [p for p, n in counts.items() if 2 * n >= len(keys)]


def align_state_dict_keys(weights: Mapping[str, Any], expected: Sequence[str]) -> dict[str, Any]:
    """Rename ``weights``' keys to best fit ``expected``, adding or removing wrapper prefixes.

    Composer saves a ``ComposerClassifier`` under ``module.``, a ``HuggingFaceModel`` under ``model.``, and DDP
    adds ``module.``; a teacher may be given wrapped or bare either way. Every candidate renaming (strip one
    shared prefix, add one, or both) is scored by how many expected keys it produces; the best one wins, with
    no renaming preferred on ties. A model whose own submodule is called ``model`` is therefore safe.
    """
    expected_set = set(expected)
    strips = [''] + _shared_prefixes(list(weights))
    adds = [''] + _shared_prefixes(list(expected))

    def rename(strip: str, add: str) -> dict[str, Any]:
        return {add + (k[len(strip) :] if strip and k.startswith(strip) else k): v for k, v in weights.items()}

    best, best_score = dict(weights), len(expected_set.intersection(weights))
    for strip in strips:
        for add in adds:
            if not strip and not add:
                continue
            candidate = rename(strip, add)
            score = len(expected_set.intersection(candidate))
            if score > best_score:
                best, best_score = candidate, score
    return best


def load_teacher_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load the weights at ``path`` into ``model`` and return it.

    ``path`` is a Composer checkpoint written by ``Trainer(save_folder=...)`` or a plain ``state_dict`` file,
    local or at any URI Composer's ``get_file`` reads. Wrapper prefixes are reconciled (see
    :func:`align_state_dict_keys`). Every key and shape is checked before anything is copied, so on error
    ``model`` is left exactly as it was; the file is never written to.

    Args:
        model (nn.Module): The teacher's architecture.
        path (str): Where its weights are.

    Returns:
        nn.Module: ``model``, now holding the weights.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file cannot be read, or its weights do not fit ``model`` (the message names the file,
            the first missing and unexpected keys, and mismatched shapes).

    Example:
        .. testcode::

            import os, tempfile
            import torch
            from composer_kd.models.checkpoints import load_teacher_checkpoint

            path = os.path.join(tempfile.mkdtemp(), 'teacher.pt')
            torch.save(torch.nn.Linear(4, 2).state_dict(), path)
            teacher = load_teacher_checkpoint(torch.nn.Linear(4, 2), path)
    """
    weights = _model_weights(_read_checkpoint_file(path), path)
    target = model.state_dict()
    weights = align_state_dict_keys(weights, list(target))
    missing = [k for k in target if k not in weights]
    unexpected = [k for k in weights if k not in target]
    mismatched = [
        f'{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}'
        for k, v in target.items()
        if k in weights and isinstance(weights[k], torch.Tensor) and weights[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f'{len(missing)} missing keys, first {missing[:_KEYS_SHOWN]}')
        if unexpected:
            details.append(f'{len(unexpected)} unexpected keys, first {unexpected[:_KEYS_SHOWN]}')
        if mismatched:
            details.append(f'{len(mismatched)} shape mismatches, first {mismatched[:_KEYS_SHOWN]}')
        raise ValueError(
            f'Weights in teacher checkpoint {path!r} do not fit {type(model).__name__}: ' + '; '.join(details) + '.'
        )
    model.load_state_dict(weights, strict=True)
    return model
