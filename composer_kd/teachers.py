"""Teachers: accepting them in every form a user has them, loading their checkpoints, and freezing them."""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from composer.models import HuggingFaceModel
from composer.utils import get_file
from torch import nn

__all__ = [
    'FrozenTeachers',
    'TeacherInference',
    'TeacherRunner',
    'TeacherSpec',
    'load_teacher_checkpoint',
    'resolve_teachers',
]

#: What ``Distillation(teachers=...)`` accepts.
TeacherSpec = Union[nn.Module, Sequence[nn.Module], Mapping[str, nn.Module]]

# How many offending keys an error message shows; a full list for a mismatched model would be thousands.
_KEYS_SHOWN = 5


def _read_checkpoint_file(path: str) -> Any:
    """Read a checkpoint through Composer's ``get_file``, so a path may be local or any URI Composer reads."""
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
        except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
            raise ValueError(
                f'Teacher checkpoint {path!r} could not be read (truncated or not a PyTorch checkpoint): {e}'
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
            from composer_kd.teachers import load_teacher_checkpoint

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


def resolve_teachers(teachers: TeacherSpec) -> list[nn.Module]:
    """Turn every accepted form of ``teachers`` into a list of modules, loading checkpoints where given.

    Args:
        teachers: A module (plain, ``ComposerModel`` or Hugging Face ``PreTrainedModel``), a list of modules, or a
            dict ``{checkpoint_path: module}`` whose weights are loaded from each path.

    Returns:
        list[nn.Module]: The teachers, in the order given.

    Raises:
        ValueError: If there are no teachers.
        TypeError: If an entry is not a module, or a dict key is not a path.
    """
    if isinstance(teachers, nn.Module):
        return [teachers]
    if isinstance(teachers, Mapping):
        resolved = []
        for path, model in teachers.items():
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f'teachers: dict keys must be checkpoint paths, got {type(path).__name__}.')
            if not isinstance(model, nn.Module):
                raise TypeError(f'teachers[{path!r}] must be an nn.Module, got {type(model).__name__}.')
            resolved.append(load_teacher_checkpoint(model, os.fspath(path)))
    elif isinstance(teachers, Sequence) and not isinstance(teachers, str):
        resolved = list(teachers)
        for i, model in enumerate(resolved):
            if not isinstance(model, nn.Module):
                raise TypeError(f'teachers[{i}] must be an nn.Module, got {type(model).__name__}.')
    else:
        raise TypeError(
            'teachers must be an nn.Module, a list of modules, or a dict {checkpoint_path: module}, '
            f'got {type(teachers).__name__}.'
        )
    if not resolved:
        raise ValueError('teachers: at least one teacher is required, got none.')
    return resolved


@dataclass
class _ModuleFlags:
    training: dict[str, bool]
    requires_grad: dict[str, bool]


class FrozenTeachers:
    """Holds teachers frozen for a fit: eval mode, no gradients; restores the user's flags afterwards.

    Args:
        teachers (list[nn.Module]): The teachers.
    """

    def __init__(self, teachers: list[nn.Module]):
        self.modules = teachers
        self._saved: list[_ModuleFlags] = []

    def freeze(self) -> None:
        """Put every teacher in eval mode with gradients off, remembering what each had."""
        self._saved = [
            _ModuleFlags(
                training={name: m.training for name, m in teacher.named_modules()},
                requires_grad={name: p.requires_grad for name, p in teacher.named_parameters()},
            )
            for teacher in self.modules
        ]
        for teacher in self.modules:
            teacher.eval()
            teacher.requires_grad_(False)

    def restore(self) -> None:
        """Give each teacher back the train/eval modes and ``requires_grad`` flags it had before :meth:`freeze`."""
        if not self._saved:  # never frozen (the fit failed before starting)
            return
        for teacher, flags in zip(self.modules, self._saved, strict=True):
            for name, module in teacher.named_modules():
                module.training = flags.training.get(name, module.training)
            for name, param in teacher.named_parameters():
                param.requires_grad_(flags.requires_grad.get(name, param.requires_grad))
        self._saved = []


@dataclass
class TeacherInference:
    """How teachers are run: opt-in speed-ups, each off by default until measured to help where it is used.

    Whether one helps depends on the hardware and the model; :func:`~composer_kd.speed.measure_teacher_inference`
    times the teacher's forward pass with each on the machine at hand.

    Args:
        dtype (torch.dtype, optional): Keep a copy of each teacher's weights in this dtype (e.g.
            ``torch.bfloat16``) and feed it floating inputs of that dtype. The user's teacher is not converted.
        channels_last (bool): Lay CNN teachers and their 4-D inputs out channels-last.
        compile (bool | dict): Compile each teacher with ``torch.compile`` (a dict gives its keyword arguments).

    Example:
        .. testcode::

            import torch
            from composer_kd import Distillation, TeacherInference

            teacher = torch.nn.Linear(8, 3)
            distillation = Distillation(teacher, teacher_inference=TeacherInference(dtype=torch.bfloat16))
    """

    dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    compile: Union[bool, dict[str, Any]] = False

    @property
    def enabled(self) -> bool:
        return self.dtype is not None or self.channels_last or bool(self.compile)


def _adapt_inputs(batch: Any, options: TeacherInference) -> Any:
    """A copy of ``batch`` whose floating tensors have the teacher's dtype and layout; integers stay as they are."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            if options.dtype is not None:
                batch = batch.to(options.dtype)
            if options.channels_last and batch.ndim == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {k: _adapt_inputs(v, options) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_adapt_inputs(v, options) for v in batch)
    return batch


class TeacherRunner:
    """Runs one frozen teacher with :class:`TeacherInference` options, and undoes them when the fit ends.

    Args:
        teacher (nn.Module): The (frozen, placed) teacher.
        options (TeacherInference): What to apply.
    """

    def __init__(self, teacher: nn.Module, options: TeacherInference):
        self.teacher = teacher
        self.options = options
        self.module = teacher
        self._changed_user_module = False

    def prepare(self) -> nn.Module:
        """Apply the options; return the module that will run (whose submodules feature hooks must watch)."""
        options = self.options
        module = self.teacher
        if options.dtype is not None:
            # A converted copy: casting the user's own module down and back would lose its precision.
            module = copy.deepcopy(self.teacher).to(dtype=options.dtype)
        if options.channels_last:
            module.to(memory_format=torch.channels_last)
        if options.compile:
            target = module.model if isinstance(module, HuggingFaceModel) else module
            target.compile(**(options.compile if isinstance(options.compile, dict) else {}))
        self._changed_user_module = module is self.teacher and (options.channels_last or bool(options.compile))
        self.module = module
        return module

    def inputs(self, batch: Any) -> Any:
        return _adapt_inputs(batch, self.options) if (self.options.dtype or self.options.channels_last) else batch

    def release(self) -> None:
        """Give the user's teacher back in its own layout and uncompiled; drop any converted copy."""
        if self._changed_user_module:
            if self.options.channels_last:
                self.teacher.to(memory_format=torch.contiguous_format)
            if self.options.compile:
                target = self.teacher.model if isinstance(self.teacher, HuggingFaceModel) else self.teacher
                target._compiled_call_impl = None
        self.module = self.teacher
        self._changed_user_module = False
