"""The output layer of a language model, as the fused path finds and intercepts it: which ``nn.Linear`` gives the
logits (:func:`output_layer`), recording its input in place of its logits during training
(:class:`OutputLayerCapture`), its weight made whole again under FSDP version 2, and the refusal of FSDP version 1
(:func:`refuse_fsdp_v1_student`). :mod:`composer_kd.parts.fused` computes the loss from what it records.
"""

from __future__ import annotations

from typing import Optional

import torch
from composer.core import State
from composer.models import HuggingFaceModel
from composer.utils.parallelism import FSDPConfig
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from composer_kd.models.sharding import unsharded_class

__all__ = ['OutputLayerCapture', 'ThroughPlaceholder', 'output_layer', 'refuse_fsdp_v1_student']


def _network(model: nn.Module) -> nn.Module:
    """The network inside Composer's and PyTorch's wrappers: a ``HuggingFaceModel``'s ``model``, inside DDP or an
    FSDP version 1 root."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, HuggingFaceModel):
        model = model.model
    if isinstance(model, FullyShardedDataParallel):
        model = model.module
    return model


def _class_name(module: nn.Module) -> str:
    """The module's class name; FSDP version 2's generated subclass (``FSDPLinear``) is named by its model class."""
    return unsharded_class(module).__name__


def _path_to(root: nn.Module, target: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` of each module from ``root`` down to ``target``, both included; empty when
    ``target`` is not inside ``root``."""
    name = next((qualified for qualified, module in root.named_modules() if module is target), None)
    if name is None:
        return []
    path, current = [('', root)], root
    for part in name.split('.') if name else []:
        current = current._modules[part]
        path.append((f'{path[-1][0]}.{part}'.lstrip('.'), current))
    return path


def _refuse_fsdp_v1(model: nn.Module, layer: nn.Module, role: str) -> None:
    """Refuse a model sharded by FSDP version 1, naming where its output layer sits.

    The fused loss reads the output layer's weight at ``Event.AFTER_LOSS``, after the forward pass, and its gradient
    must reach FSDP's reduction. Version 1 offers no way to gather a unit's parameters for such a computation:
    outside a forward pass a unit of its own (or any unit but the root) has freed its gathered weight, and even the
    root unit gives its parameters as flattened shards (``FULL_SHARD`` with ``use_orig_params=True``, Composer's
    default), or as views whose gradient it cannot write back (``NO_SHARD``, what version 1 runs on one process);
    with its other settings (``use_orig_params=False``, ``SHARD_GRAD_OP``) the fused loss trained a student to
    other weights than one process does, in a rehearsal on CPUs.
    """
    path = _path_to(model, layer)
    units = [module for _, module in path if isinstance(module, FullyShardedDataParallel)]
    if not units:
        return
    name = path[-1][0].replace('_fsdp_wrapped_module.', '') or _class_name(layer)
    raise _fsdp_v1_refusal(role, name, own_unit=units[-1] is layer or len(units) > 1)


def refuse_fsdp_v1_student(state: State) -> None:
    """Refuse, when the ``Trainer`` is built (``Event.INIT``, before Composer wraps the student), a student that FSDP
    version 1 will shard, naming the unit its output layer will be in (see :func:`_refuse_fsdp_v1`)."""
    if not isinstance(getattr(state, 'fsdp_config', None), FSDPConfig):
        return
    layer = output_layer(state.model)
    network = _network(state.model)
    wrap_fn = getattr(network, 'fsdp_wrap_fn', None)
    marked = getattr(layer, '_fsdp_wrap', None)
    own_unit = bool(marked) if marked is not None else callable(wrap_fn) and bool(wrap_fn(layer))
    name = next((n for n, m in network.named_modules() if m is layer), _class_name(layer))
    raise _fsdp_v1_refusal('student', name, own_unit)


def _fsdp_v1_refusal(role: str, name: str, own_unit: bool) -> ValueError:
    if own_unit:
        layout = 'is wrapped as its own FSDP unit under FSDP version 1 (or in a unit other than the root)'
    else:
        layout = 'is in the root unit of FSDP version 1'
    return ValueError(
        f"The {role}'s output layer ({name}) {layout}: fused=... computes the loss from the layer's whole weight "
        'after the forward pass, which version 1 does not give outside a forward pass (a unit of its own has '
        'released it; the root unit gives flattened shards or views whose gradient it cannot write back). Use FSDP '
        "version 2 (parallelism_config={'fsdp': FSDP2Config()}, or FSDP_VERSION=2 with llm-foundry), which gathers "
        'the weight again, with the output layer in the root unit or in a unit of its own; or DDP; or train without '
        'fused=.'
    )


def output_layer(model: nn.Module, role: str = 'student') -> nn.Linear:
    """The ``nn.Linear`` that turns ``model``'s final hidden states into logits, or a clear error.

    Args:
        model (nn.Module): A Hugging Face model (bare or in ``HuggingFaceModel``), or llm-foundry's MPT.
        role (str, optional): ``'student'`` or ``'teachers[i]'``, for messages. Default: ``'student'``.

    Returns:
        nn.Linear: The output layer (its weight ``[vocab, hidden]``).

    Raises:
        ValueError: When the output layer cannot be reached, the logits are not its output, or FSDP version 1
            shards the model.

    Example:
        .. testcode::

            import transformers
            from composer_kd.parts.fused import output_layer

            config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
            model = transformers.GPT2LMHeadModel(config)
            assert output_layer(model) is model.lm_head
    """
    network = _network(model)
    kind = _class_name(network)
    getter = getattr(network, 'get_output_embeddings', None)
    layer = getter() if callable(getter) else None
    if isinstance(layer, nn.Module):
        _refuse_fsdp_v1(model, layer, role)
    if kind == 'MPTForCausalLM' and getattr(network, 'lm_head', None) is None:
        raise ValueError(
            f'The {role} is an MPT model with tied word embeddings: its logits are F.linear on the input '
            "embedding's weight, outside any output module, so fused=... cannot intercept them. Build it with "
            'tie_word_embeddings=False, or train without fused=.'
        )
    if not isinstance(layer, nn.Linear):
        found = 'nothing' if layer is None else type(layer).__name__
        raise ValueError(
            f"fused=... needs the {role}'s output layer, an nn.Linear from get_output_embeddings() (Hugging Face "
            f'causal and masked language models, llm-foundry models); the {role} ({kind}) gives {found}. Train '
            'without fused=.'
        )
    config = getattr(network, 'config', None)
    for attribute in ('final_logit_softcapping', 'logit_scale'):
        value = getattr(config, attribute, None) or getattr(network, attribute, None)
        if value not in (None, 1, 1.0) and not isinstance(value, nn.Module):
            raise ValueError(
                f'The {role} ({kind}) transforms its logits after the output layer ({attribute}={value!r}), so the '
                'fused loss would not be its loss. Train without fused=.'
            )
    return layer


class _Placeholder(torch.autograd.Function):
    """Zero-stride zeros of the logits' shape (a single zero, broadcast) that require a gradient and ignore it.

    Their ``anchor`` (the layer's input) makes them require a gradient; their backward pass gives it none, so they
    change no gradient, and cost no memory either way.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=anchor.device).expand(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        return None, None, None


class ThroughPlaceholder(torch.autograd.Function):
    """``total`` unchanged, and in the backward pass a zero-stride zero gradient for the placeholder logits, so that
    the hooks a wrapper registered on the model's outputs (FSDP's pre-backward hooks) run as on real logits."""

    @staticmethod
    def forward(ctx, total: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
        ctx.placeholder = (placeholder.shape, placeholder.dtype, placeholder.device)
        return total.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.placeholder
        return grad, torch.zeros((), dtype=dtype, device=device).expand(shape)


def _fsdp_unit(model: nn.Module, layer: nn.Module) -> Optional[nn.Module]:
    """The FSDP version 2 module whose unit holds ``layer``'s parameters: the nearest of ``layer`` and the modules
    above it inside ``model`` that ``fully_shard`` was applied to (``None`` when there is none)."""
    units = [module for _, module in _path_to(model, layer) if isinstance(module, FSDPModule)]
    return units[-1] if units else None


def _sharded_by_fsdp(model: nn.Module) -> bool:
    """Whether any part of ``model`` is an FSDP unit (version 1 or 2)."""
    return any(isinstance(module, (FullyShardedDataParallel, FSDPModule)) for module in model.modules())


class OutputLayerCapture:
    """While on, an output layer records its input and returns a zero-stride placeholder instead of its logits.

    The layer's ``forward`` is replaced by an instance attribute for the fit (removed by :meth:`remove`), so the
    projection itself never runs; a forward pre-hook on the network drops ``labels`` from its keyword arguments,
    so a Hugging Face model computes no loss of its own. When off, or when the network is in eval mode, both
    pass everything through.

    Under FSDP version 2, :meth:`gather` makes the layer's weight whole again where its unit released it after the
    layer's forward pass; for a model sharded by FSDP (either version) the placeholder requires a gradient (see
    :meth:`~composer_kd.parts.fused.FusedSource.terms`).

    Args:
        model (nn.Module): The model whose output layer to watch.
        role (str, optional): For messages. Default: ``'student'``.
        training_only (bool, optional): Pass through while the network is in eval mode even when on (the
            student's evaluation sees its logits; teachers always run in eval mode). Default: ``True``.
    """

    def __init__(self, model: nn.Module, role: str = 'student', training_only: bool = True):
        self.network = _network(model)
        self.training_only = training_only
        self.layer = output_layer(model, role)
        self.unit = _fsdp_unit(model, self.layer)
        self.placeholder_requires_grad = _sharded_by_fsdp(model)
        self.on = False
        self.hidden: Optional[torch.Tensor] = None
        self._handle = None

    def install(self) -> None:
        layer_forward = type(self.layer).forward.__get__(self.layer)

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            if not self.on or (self.training_only and not self.network.training):
                return layer_forward(inputs)
            self.hidden = inputs
            device_type = inputs.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else inputs.dtype
            shape = (*inputs.shape[:-1], self.layer.out_features)
            if self.placeholder_requires_grad and torch.is_grad_enabled():
                # Anchored on the layer's input, so that the backward pass reaches that input (and the hooks FSDP
                # put on it, which reduce the layer's gradient) only after the placeholder's own hooks ran.
                anchor = inputs if inputs.requires_grad else torch.zeros((), device=inputs.device, requires_grad=True)
                return _Placeholder.apply(anchor, shape, dtype)
            return torch.zeros((), dtype=dtype, device=inputs.device).expand(shape)

        self.layer.forward = forward
        self._handle = self.network.register_forward_pre_hook(self._drop_labels, with_kwargs=True)

    def gather(self) -> Optional[nn.Module]:
        """Make the layer's weight whole where FSDP version 2 holds it sharded now (its unit released it after the
        layer's forward pass): the unit's ``unshard()``, a collective every rank calls alike.

        Returns:
            nn.Module | None: The unit gathered, to be released with ``reshard()`` once done with (for the student
            FSDP does so itself after the backward pass); ``None`` when the weight was whole already.
        """
        if self.unit is None or not isinstance(self.layer.weight, DTensor):
            return None
        self.unit.unshard()
        if isinstance(self.layer.weight, DTensor):  # unshard() reached no unit holding this layer
            raise RuntimeError(
                f'FSDP did not gather the output layer {_class_name(self.layer)} of {_class_name(self.network)}: '
                'fused=... needs its whole weight.'
            )
        return self.unit

    def _drop_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        if self.on and 'labels' in kwargs:
            return args, {k: v for k, v in kwargs.items() if k != 'labels'}
        return None

    def take(self) -> torch.Tensor:
        """The recorded hidden states as ``[tokens, hidden]``; the record is cleared."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError(
                f'The output layer {type(self.layer).__name__} of {type(self.network).__name__} did not run in the '
                'forward pass: fused=... cannot find the final hidden states.'
            )
        return hidden.reshape(-1, hidden.shape[-1])

    def remove(self) -> None:
        self.on = False
        self.hidden = None
        self.layer.__dict__.pop('forward', None)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
