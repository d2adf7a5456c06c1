"""Magnitude pruning with ``torch.nn.utils.prune``: masks that hold through training, made permanent for export.

``torch.nn.utils.prune`` keeps a pruned layer's trainable tensor as ``weight_orig`` (the same ``Parameter`` object
the optimizer already holds) and a ``weight_mask`` buffer, and recomputes ``weight = weight_orig * weight_mask``
before every forward pass. The optimizer may move ``weight_orig`` where the mask is zero, but the weight the
network uses stays exactly zero there, and :func:`make_pruning_permanent` bakes the masks in. The functions here
never change the model they are given; the :class:`Pruning` algorithm changes the trainer's student, as Composer's
own algorithms do.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn
from torch.nn.utils import prune

from composer_kd.options import did_you_mean
from composer_kd.schedules import Schedule
from composer_kd.window import TimeSpec, parse_time

__all__ = [
    'PRUNABLE_TYPES',
    'Pruning',
    'copy_model',
    'make_pruning_permanent',
    'prunable_modules',
    'prune_model',
    'pruning_masks',
    'sparsity',
]

#: Layers whose ``weight`` can be pruned (Composer's and torch's quantization-aware versions subclass these).
PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Module paths to prune: one path, several, or ``None`` for the default choice (see :func:`prunable_modules`).
ModulePaths = Union[str, Sequence[str], None]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also works for pruned models and models a ``Trainer`` has used.

    ``copy.deepcopy`` refuses a pruned layer once its ``weight`` (recomputed from ``weight_orig`` and the mask
    before every forward pass) carries a gradient graph, and would copy the logger a Composer ``Trainer`` attaches
    to its model. Here the recomputed weights are copied detached (the copy recomputes them on its first forward
    pass anyway) and the logger is shared rather than copied. ``model`` itself is left untouched.

    Args:
        model (nn.Module): Any module.

    Returns:
        nn.Module: An independent copy.

    Example:
        .. testcode::

            import torch
            from torch.nn.utils import prune
            from composer_kd.compression import copy_model

            layer = torch.nn.Linear(4, 2)
            prune.l1_unstructured(layer, 'weight', amount=0.5)
            twin = copy_model(layer)
            assert torch.equal(twin.weight_mask, layer.weight_mask) and twin.weight_orig is not layer.weight_orig
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                derived = getattr(module, hook._tensor_name, None)
                if isinstance(derived, torch.Tensor) and derived.grad_fn is not None:
                    memo[id(derived)] = derived.detach().clone()
    logger = getattr(model, 'logger', None)
    if logger is not None:
        memo[id(logger)] = logger
    return copy.deepcopy(model, memo)


def prunable_modules(model: nn.Module, modules: ModulePaths = None) -> dict[str, nn.Module]:
    """The layers to prune, by their path in ``model`` (as ``model.named_modules()`` names them).

    Args:
        model (nn.Module): The model.
        modules (str | Sequence[str], optional): Paths of Linear or Conv layers. Default: every Linear and Conv
            layer except the last one, which is taken to be the classifier: its rows are the classes, so pruning
            it structurally would delete classes, and it is usually a small share of the weights.

    Returns:
        dict[str, nn.Module]: ``{path: layer}``, in the model's order.

    Raises:
        ValueError: If a path names no module (the message names ``modules[i]`` and the nearest path) or a module
            that is not a Linear or Conv layer, or if by default there is no layer to prune.

    Example:
        .. testcode::

            import torch
            from composer_kd.compression import prunable_modules

            mlp = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
            assert list(prunable_modules(mlp)) == ['0']
    """
    named = dict(model.named_modules())
    layers = [name for name, module in named.items() if isinstance(module, PRUNABLE_TYPES)]
    if modules is None:
        if len(layers) < 2:
            raise ValueError(
                f'modules: by default every Linear and Conv layer but the last (the classifier) is pruned, and this '
                f'model has {len(layers)} such layer{"s" if len(layers) != 1 else ""}; name the layers to prune.'
            )
        return {name: named[name] for name in layers[:-1]}
    paths = [modules] if isinstance(modules, str) else list(modules)
    if not paths:
        raise ValueError('modules: an empty list prunes nothing; leave it out to prune the default layers.')
    chosen = {}
    for i, path in enumerate(paths):
        if path not in named:
            hint = did_you_mean(path, layers, cutoff=0.5)
            raise ValueError(
                f'modules[{i}]: the model has no module {path!r}{hint} (its Linear and Conv layers: '
                f'{", ".join(layers) or "none"})'
            )
        if not isinstance(named[path], PRUNABLE_TYPES):
            raise ValueError(
                f'modules[{i}]: {path!r} is a {type(named[path]).__name__}; only Linear and Conv layers are pruned '
                f'(this model has: {", ".join(layers) or "none"})'
            )
        chosen[path] = named[path]
    return chosen


def _check_amount(amount: Any, name: str = 'amount') -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(f'{name} must be a fraction in [0, 1), got {amount!r}.')
    return float(amount)


def _pruning_hook(module: nn.Module, name: str) -> Optional[prune.BasePruningMethod]:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return hook
    return None


def _effective(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor ``name`` as the next forward pass will use it: ``orig * mask`` for a pruned one."""
    if _pruning_hook(module, name) is None:
        return getattr(module, name).detach()
    return (getattr(module, f'{name}_orig') * getattr(module, f'{name}_mask')).detach()


def _units_alive(mask: torch.Tensor) -> torch.Tensor:
    """Which output units (rows / filters, dimension 0) still have a weight."""
    return mask.flatten(1).any(dim=1)


def _prune_layer(module: nn.Module, amount: float, structured: bool) -> None:
    """Raise ``module``'s pruned share to ``amount`` (never lowering it), in place.

    The layer is reparametrized even when nothing is pruned yet, so that its ``state_dict`` has one layout
    (``weight_orig``, ``weight_mask``) for the whole of a training run and checkpoints load into it at any step.
    """
    weight = _effective(module, 'weight')
    mask = getattr(module, 'weight_mask', None)
    if structured:
        done = 0 if mask is None else int((~_units_alive(mask)).sum())
        extra = round(amount * weight.shape[0]) - done
    else:
        done = 0 if mask is None else int((mask == 0).sum())
        extra = round(amount * weight.numel()) - done
    # On a layer already pruned, PyTorch counts an integer amount among the entries (or units) still alive and
    # ranks them by the importance given, here the weights in force, not those of the last forward pass.
    if extra > 0 and structured:
        prune.ln_structured(module, 'weight', amount=extra, n=2, dim=0, importance_scores=weight)
    elif extra > 0:
        prune.l1_unstructured(module, 'weight', amount=extra, importance_scores=weight)
    elif mask is None:
        prune.identity(module, 'weight')
    bias = getattr(module, 'bias', None)
    if structured and bias is not None:
        # A unit without weights would still output its bias; zero that too, so the unit is really gone.
        alive = _units_alive(module.weight_mask).to(bias.dtype)
        if _pruning_hook(module, 'bias') is None or not torch.equal(module.bias_mask, alive):
            prune.custom_from_mask(module, 'bias', alive)


def _prune_in_place(model: nn.Module, amount: float, structured: bool, modules: ModulePaths) -> dict[str, nn.Module]:
    layers = prunable_modules(model, modules)
    for layer in layers.values():
        _prune_layer(layer, amount, structured)
    return layers


def prune_model(
    model: nn.Module,
    amount: float,
    structured: bool = False,
    modules: ModulePaths = None,
) -> nn.Module:
    """A copy of ``model`` whose chosen layers are magnitude-pruned to ``amount``, masks kept for training on.

    Unstructured pruning zeroes the ``amount`` share of each layer's weights smallest in magnitude
    (``prune.l1_unstructured``). Structured pruning removes the ``amount`` share of each layer's output units
    (rows of a Linear weight, filters of a convolution) with the smallest L2 norm (``prune.ln_structured`` over
    dimension 0), and their biases with them. On a model pruned before, each layer's share is raised to
    ``amount`` (what is pruned stays pruned); a smaller ``amount`` changes nothing.

    Args:
        model (nn.Module): The model; it is not changed.
        amount (float): The share of each layer to prune, in ``[0, 1)``.
        structured (bool, optional): Prune whole output units instead of single weights. Default: ``False``.
        modules (str | Sequence[str], optional): Paths of the layers to prune. Default: see
            :func:`prunable_modules` (every Linear and Conv layer but the last).

    Returns:
        nn.Module: The pruned copy, its layers reparametrized as ``weight_orig`` and ``weight_mask`` (see
        :func:`make_pruning_permanent` to export it).

    Raises:
        ValueError: If ``amount`` is not in ``[0, 1)`` or ``modules`` names no prunable layer (before anything
            is copied or pruned).

    Example:
        .. testcode::

            import torch
            from composer_kd.compression import prune_model, sparsity

            mlp = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
            pruned = prune_model(mlp, amount=0.5)
            assert sparsity(pruned, modules=['0']) == 0.5 and sparsity(mlp) == 0.0
    """
    amount = _check_amount(amount)
    prunable_modules(model, modules)  # refuse bad paths before copying anything
    pruned = copy_model(model)
    _prune_in_place(pruned, amount, structured, modules)
    return pruned


def remove_pruning_in_place(model: nn.Module) -> nn.Module:
    """Bake every pruning mask of ``model`` into its weights (``prune.remove``), in place, and return it."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def make_pruning_permanent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every pruning mask baked in (``prune.remove``): plain ``weight`` tensors, zeros
    where pruned, and no ``weight_orig`` / ``weight_mask`` left, so its ``state_dict`` loads into an unpruned
    model of the same architecture.

    Args:
        model (nn.Module): A model pruned with :func:`prune_model`, :class:`Pruning` or ``torch.nn.utils.prune``
            (an unpruned one is simply copied). It is not changed.

    Returns:
        nn.Module: The exported copy.

    Example:
        .. testcode::

            import torch
            from composer_kd.compression import make_pruning_permanent, prune_model

            mlp = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
            exported = make_pruning_permanent(prune_model(mlp, amount=0.5))
            assert set(exported.state_dict()) == set(mlp.state_dict())
            assert int((exported[0].weight == 0).sum()) == 16
    """
    return remove_pruning_in_place(copy_model(model))


def pruning_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every pruning mask in ``model``: ``{'<module path>.<tensor name>': mask}`` (the masks themselves)."""
    return {
        f'{path}.{name[: -len("_mask")]}'.lstrip('.'): buffer
        for path, module in model.named_modules()
        for name, buffer in module.named_buffers(recurse=False)
        if name.endswith('_mask') and _pruning_hook(module, name[: -len('_mask')]) is not None
    }


def sparsity(model: nn.Module, modules: ModulePaths = None) -> float:
    """The share of exact zeros among the weights that the next forward pass uses.

    Args:
        model (nn.Module): A model, pruned or not (a pruned layer counts ``weight_orig * weight_mask``).
        modules (str | Sequence[str], optional): Paths of the layers to count. Default: every Linear and Conv
            layer, the classifier included.

    Returns:
        float: Zeros over weights, in ``[0, 1]``; biases are not counted.

    Example:
        .. testcode::

            import torch
            from composer_kd import sparsity

            model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
            with torch.no_grad():
                model[0].weight[:2] = 0.0  # 8 of the 16 + 8 weights
            assert sparsity(model) == 8 / 24 and sparsity(model, '0') == 0.5
    """
    if modules is None:
        layers = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    else:
        layers = list(prunable_modules(model, modules).values())
    zeros = total = 0
    for layer in layers:
        weight = _effective(layer, 'weight')
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


class _GradualSparsity(Schedule):
    """``amount * (1 - (1 - progress) ** 3)``: fast at first, gently at the end (Zhu and Gupta, 2017).

    With ``end`` equal to ``start`` it is a step: 0 before ``start``, ``amount`` from it on.
    """

    def shape(self, progress: float) -> float:
        return 1.0 - (1.0 - progress) ** 3


class Pruning(Algorithm):
    """Magnitude pruning of the student during a fit, at one moment or gradually; composes with ``Distillation``.

    At ``Event.INIT`` the chosen layers of the trainer's model are reparametrized with all-ones masks
    (``prune.identity``): ``weight`` becomes ``weight_orig``, the very ``Parameter`` the optimizer holds, plus a
    ``weight_mask`` buffer. Their ``state_dict`` keeps that layout for the whole run, so Composer checkpoints
    written at any step load back (masks included) into a trainer given this algorithm, and a resumed run goes on
    with the saved masks. At the start of each batch from ``start`` on, each layer's pruned share is raised to
    the target: ``amount`` at once when ``end`` is ``None``, else rising from 0 at ``start`` to ``amount`` at
    ``end`` along ``amount * (1 - (1 - progress) ** 3)``. The masks are applied before every forward pass, so
    pruned weights stay exactly zero whatever the optimizer does. Teachers are never touched: only the trainer's
    model is pruned.

    The student keeps its masks after the fit (to fine-tune further); export it with
    :func:`make_pruning_permanent`. With :class:`~composer_kd.compression.QuantizationAwareTraining`, list that
    algorithm first, so the layers pruned are the quantization-aware ones.

    Args:
        amount (float): Target share of each layer, in ``[0, 1)``: of its weights, or of its output units when
            ``structured``.
        structured (bool, optional): Prune whole output units (see :func:`prune_model`). Default: ``False``.
        modules (str | Sequence[str], optional): Paths of the layers in the trainer's model (for a
            ``ComposerClassifier``, e.g. ``'module.1'``). Default: every Linear and Conv layer but the last.
        start (str | float | Time, optional): When pruning starts: a Composer time string or a fraction of
            training. Default: ``0.0``, before the first batch.
        end (str | float | Time, optional): When the target reaches ``amount``. Default: ``None``, all at once
            at ``start``.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import DataLoader, TensorDataset
            from composer import Trainer
            from composer.models import ComposerClassifier
            from composer_kd import Distillation
            from composer_kd.compression import Pruning, make_pruning_permanent

            data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
            teacher = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
            network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            student = ComposerClassifier(network, num_classes=3)
            trainer = Trainer(
                model=student,
                train_dataloader=DataLoader(data, batch_size=8),
                max_duration='2ep',
                algorithms=[Pruning(amount=0.5, start='1ep'), Distillation(teacher)],
            )
            trainer.fit()
            exported = make_pruning_permanent(student)
            assert float((exported.module[0].weight == 0).float().mean()) == 0.5
    """

    def __init__(
        self,
        amount: float,
        structured: bool = False,
        modules: ModulePaths = None,
        start: TimeSpec = 0.0,
        end: Optional[TimeSpec] = None,
    ):
        self.amount = _check_amount(amount)
        if not isinstance(structured, bool):
            raise TypeError(f'structured must be True or False, got {structured!r}.')
        self.structured = structured
        self.modules = [modules] if isinstance(modules, str) else (None if modules is None else list(modules))
        start_time = parse_time(start, 'start')
        end_time = start_time if end is None else parse_time(end, 'end')
        if end is not None and end_time.unit == start_time.unit and end_time.value <= start_time.value:
            raise ValueError(f'end={end!r} must come after start={start!r}.')
        self.schedule = _GradualSparsity(0.0, self.amount, start=start_time, end=end_time)
        self._reached = 0.0
        self._layers: dict[str, nn.Module] = {}

    def __repr__(self) -> str:
        return (
            f'Pruning(amount={self.amount}, structured={self.structured}, modules={self.modules}, '
            f'start={self.schedule.start}, end={self.schedule.end})'
        )

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_START:
            return self._reached < self.amount
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._layers = _prune_in_place(state.model, 0.0, self.structured, self.modules)
        else:
            # A resumed run's masks came with its checkpoint: layers already at the target are left as they are.
            target = self.schedule(state)
            if target <= self._reached:
                return
            for layer in self._layers.values():
                _prune_layer(layer, target, self.structured)
            self._reached = target
            logger.log_metrics({'pruning/sparsity': sparsity(state.model, list(self._layers))})
