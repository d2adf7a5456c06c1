"""Quantization-aware training with PyTorch's FX graph mode (``torch.ao.quantization``), then int8 conversion.

FX graph mode traces the network, fuses Linear/Conv with a following ReLU (and Conv with BatchNorm), and inserts
fake quantization of weights and activations where the backend's int8 kernels will quantize them, with no manual
``QuantStub``/``DeQuantStub`` or fusion lists. The prepared network shares its weight ``Parameter`` objects with
the network it was made from, so an optimizer built before preparation keeps training the right tensors.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.models import ComposerClassifier, ComposerModel
from torch import nn
from torch.ao.nn.intrinsic import qat as intrinsic_qat
from torch.ao.quantization import FakeQuantizeBase, get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
from torch.fx import GraphModule

from composer_kd.compression.pruning import copy_model, remove_pruning_in_place
from composer_kd.window import TimeSpec, parse_time, reached, to_trainer_time

__all__ = [
    'QAT_BACKENDS',
    'QuantizationAwareTraining',
    'calibrate',
    'convert_to_int8',
    'fake_quantizers',
    'prepare_qat',
    'quantization_backend',
    'quantized_engine',
]

#: Backends with a default QAT configuration in ``torch.ao.quantization``; this machine's build supports those
#: also listed in ``torch.backends.quantized.supported_engines``.
QAT_BACKENDS = ('x86', 'fbgemm', 'qnnpack', 'onednn')

# Where the backend is recorded on a prepared network (GraphModule.meta survives deep copies).
_BACKEND_KEY = 'composer_kd_quantization_backend'

#: Example inputs: one tensor, or a tuple of the network's positional arguments.
ExampleInputs = Union[torch.Tensor, tuple[Any, ...]]


def _check_backend(backend: Any) -> str:
    if backend not in QAT_BACKENDS:
        raise ValueError(f'backend must be one of {", ".join(QAT_BACKENDS)}, got {backend!r}.')
    supported = torch.backends.quantized.supported_engines
    if backend not in supported:
        raise ValueError(
            f'backend={backend!r}: this PyTorch build has no {backend} quantized engine (it has: '
            f'{", ".join(e for e in supported if e != "none")}).'
        )
    return backend


@contextlib.contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """Run the block with ``torch.backends.quantized.engine`` set to ``backend``, then restore it.

    Int8 weights are packed for the engine in force when a model is converted or its ``state_dict`` loaded, and
    must run under the same one.

    Example:
        .. testcode::

            import torch
            from composer_kd.compression import quantized_engine

            with quantized_engine('x86'):
                assert torch.backends.quantized.engine == 'x86'
    """
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = _check_backend(backend)
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _network(model: nn.Module, what: str = 'model') -> nn.Module:
    """The module quantization works on: a ``ComposerClassifier``'s ``module``, or a plain ``nn.Module`` itself."""
    if isinstance(model, ComposerClassifier):
        return model.module
    if isinstance(model, ComposerModel):
        raise TypeError(
            f'{what} is a {type(model).__name__}; quantization-aware training here handles a ComposerClassifier '
            '(its network is traced with torch.fx) or a plain nn.Module.'
        )
    return model


def quantization_backend(model: nn.Module) -> Optional[str]:
    """The backend ``model`` was prepared for by :func:`prepare_qat`, or ``None`` if it was not prepared."""
    network = model.module if isinstance(model, ComposerClassifier) else model
    return network.meta.get(_BACKEND_KEY) if isinstance(network, GraphModule) else None


def _is_pruned(module: nn.Module) -> bool:
    return any(name.endswith('_orig') for name, _ in module.named_parameters())


def _prepared_network(network: nn.Module, example_inputs: ExampleInputs, backend: str) -> GraphModule:
    if _is_pruned(network):
        raise ValueError(
            'model has pruning masks (weight_orig / weight_mask): prepare it for quantization-aware training '
            'before pruning it (list QuantizationAwareTraining before Pruning), or make the pruning permanent first.'
        )
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = network.training
    with warnings.catch_warnings():
        # PyTorch's own default x86 configuration still passes reduce_range, which its observers warn about.
        warnings.filterwarnings('ignore', message='Please use quant_min and quant_max', category=UserWarning)
        prepared = prepare_qat_fx(network.train(), get_default_qat_qconfig_mapping(backend), inputs)
    network.train(was_training)
    prepared.train(was_training)
    prepared.meta[_BACKEND_KEY] = backend
    return prepared


def _prepare_in_place(model: ComposerClassifier, example_inputs: ExampleInputs, backend: str) -> None:
    """Replace ``model.module`` by its prepared version, which holds the very same parameters."""
    parameters = {id(p) for p in model.parameters()}
    model.module = _prepared_network(model.module, example_inputs, backend)
    if not {id(p) for p in model.parameters()} <= parameters:
        raise RuntimeError('Preparing for quantization-aware training created new parameters the optimizer lacks.')


def prepare_qat(model: nn.Module, example_inputs: ExampleInputs, backend: str = 'x86') -> nn.Module:
    """A copy of ``model`` prepared for quantization-aware training with ``torch.ao.quantization`` (FX mode).

    The network (a ``ComposerClassifier``'s ``module``, or ``model`` itself) is traced and gets the backend's
    default QAT configuration (``get_default_qat_qconfig_mapping``): Linear/Conv + ReLU fused, per-channel int8
    weights and uint8 activations fake-quantized, with moving-average observers. Train the copy as usual (build
    its optimizer from the copy's parameters), then :func:`convert_to_int8` it.

    Args:
        model (nn.Module): A ``ComposerClassifier`` or a plain ``nn.Module`` that ``torch.fx`` can trace; not
            changed.
        example_inputs (torch.Tensor | tuple): Inputs the network takes (a batch of one suffices), as
            ``prepare_qat_fx`` asks for.
        backend (str, optional): The quantized engine the int8 model will run on: ``'x86'`` (fbgemm or oneDNN
            kernels chosen per CPU; PyTorch's default on x86), ``'fbgemm'``, ``'qnnpack'`` (ARM) or ``'onednn'``.
            Default: ``'x86'``.

    Returns:
        nn.Module: The prepared copy, of ``model``'s type (a plain network becomes a ``torch.fx.GraphModule``).

    Raises:
        ValueError: For an unknown or unsupported backend, a model already prepared, or a pruned model.
        TypeError: For a ``ComposerModel`` other than a ``ComposerClassifier``.

    Example:
        .. testcode::

            import torch
            from composer.models import ComposerClassifier
            from composer_kd.compression import prepare_qat, quantization_backend

            network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            student = prepare_qat(ComposerClassifier(network, num_classes=3), torch.zeros(1, 8))
            assert quantization_backend(student) == 'x86'
    """
    backend = _check_backend(backend)
    network = _network(model)
    if quantization_backend(model) is not None:
        raise ValueError('model is already prepared for quantization-aware training.')
    if isinstance(model, ComposerClassifier):
        prepared = copy_model(model)
        prepared.module = _prepared_network(prepared.module, example_inputs, backend)
        return prepared
    return _prepared_network(copy_model(network), example_inputs, backend)


def fake_quantizers(model: nn.Module) -> list[FakeQuantizeBase]:
    """Every fake-quantize module in ``model`` (each holds an observer and its scale and zero point)."""
    return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]


def calibrate(model: nn.Module, batches: Iterable[ExampleInputs]) -> nn.Module:
    """A copy of a prepared model whose quantization ranges are exactly those seen on ``batches``, then fixed.

    Every observer is reset, the network runs (in eval mode, without gradients) on each batch, and each range
    becomes the smallest minimum and largest maximum over all batches (the moving averages of training would
    favour the last batches instead); observers are then disabled, so nothing moves the ranges again. Together
    with :func:`prepare_qat` and :func:`convert_to_int8` this is post-training quantization; after
    quantization-aware training it re-fits the ranges to chosen data.

    Args:
        model (nn.Module): A model from :func:`prepare_qat` (trained or not); not changed.
        batches (Iterable[torch.Tensor | tuple]): The network's inputs, one batch or tuple of arguments each.

    Returns:
        nn.Module: The calibrated copy, its observers disabled.

    Raises:
        ValueError: If ``model`` was not prepared, or ``batches`` is empty.

    Example:
        .. testcode::

            import torch
            from composer_kd.compression import calibrate, convert_to_int8, prepare_qat

            network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            prepared = prepare_qat(network, torch.zeros(1, 8))
            int8 = convert_to_int8(calibrate(prepared, [torch.randn(32, 8), torch.randn(32, 8)]))
    """
    if quantization_backend(model) is None:
        raise ValueError('model was not prepared for quantization-aware training: prepare it with prepare_qat first.')
    calibrated = copy_model(model).eval()
    network = _network(calibrated)
    quantizers = fake_quantizers(calibrated)
    ranges: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for batch in batches:
            for fq in quantizers:
                fq.activation_post_process.reset_min_max_vals()
                fq.enable_observer()
            network(*(batch if isinstance(batch, tuple) else (batch,)))
            for i, fq in enumerate(quantizers):
                low, high = fq.activation_post_process.min_val, fq.activation_post_process.max_val
                if i in ranges:
                    low, high = torch.minimum(ranges[i][0], low), torch.maximum(ranges[i][1], high)
                ranges[i] = (low.clone(), high.clone())
    if not ranges and quantizers:
        raise ValueError('batches is empty: calibration needs at least one batch of inputs.')
    for i, fq in enumerate(quantizers):
        observer = fq.activation_post_process
        observer.min_val.copy_(ranges[i][0])
        observer.max_val.copy_(ranges[i][1])
        scale, zero_point = fq.calculate_qparams()
        fq.scale.copy_(scale)
        fq.zero_point.copy_(zero_point)
        fq.disable_observer()
    calibrated.train(model.training)
    return calibrated


def convert_to_int8(model: nn.Module) -> nn.Module:
    """An int8 copy of a quantization-aware model, on the CPU, in eval mode (``convert_fx``).

    Each fake-quantized Linear/Conv becomes a quantized kernel of the backend the model was prepared for, with the
    scales and zero points its observers settled on. Pruning masks, if any, are made permanent first. Run the
    result with ``torch.backends.quantized.engine`` set to that backend (see :func:`quantized_engine`; ``'x86'``
    is PyTorch's default on x86 CPUs). A ``ComposerClassifier`` stays one (its network converted), so a Composer
    ``Trainer`` on the CPU can evaluate it.

    Args:
        model (nn.Module): A model from :func:`prepare_qat` or trained with :class:`QuantizationAwareTraining`;
            not changed.

    Returns:
        nn.Module: The int8 model.

    Raises:
        ValueError: If ``model`` was not prepared for quantization-aware training.

    Example:
        .. testcode::

            import torch
            from composer.models import ComposerClassifier
            from composer_kd.compression import convert_to_int8, prepare_qat

            network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            student = prepare_qat(ComposerClassifier(network, num_classes=3), torch.zeros(1, 8))
            student.module(torch.randn(64, 8))  # observers see some activations (training would)
            logits = convert_to_int8(student).module(torch.randn(4, 8))
            assert logits.shape == (4, 3) and logits.dtype == torch.float32
    """
    backend = quantization_backend(model)
    if backend is None:
        raise ValueError(
            'model was not prepared for quantization-aware training: prepare it with prepare_qat or train it with '
            'the QuantizationAwareTraining algorithm first.'
        )
    converted = copy_model(model).cpu().eval()
    network = remove_pruning_in_place(_network(converted))
    with quantized_engine(backend), warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Please use quant_min and quant_max', category=UserWarning)
        int8 = convert_fx(network)
    int8.meta[_BACKEND_KEY] = backend
    if isinstance(converted, ComposerClassifier):
        converted.module = int8
        return converted
    return int8


class QuantizationAwareTraining(Algorithm):
    """Train the student with fake quantization (``torch.ao.quantization``), ready for :func:`convert_to_int8`.

    At ``Event.INIT`` the trainer's model (a ``ComposerClassifier``) has its network replaced by the prepared one
    (see :func:`prepare_qat`), which shares its parameters, so the optimizer already built keeps training them and
    Composer checkpoints hold the observers' state (their statistics, scales and zero points) next to the
    weights; a checkpoint loads back into a trainer given this algorithm. The teachers of ``Distillation`` are
    never prepared: only the trainer's model is.

    Observers are paused while the trainer evaluates, so validation or test images never move the quantization
    ranges; they can also be frozen for the end of training (``freeze_observers``), as can BatchNorm statistics
    of fused Conv-BN layers (``freeze_bn_stats``), as PyTorch's QAT recipes do.

    Args:
        example_inputs (torch.Tensor | tuple): Inputs the network takes (e.g. ``torch.zeros(1, 1, 8, 8)``).
        backend (str, optional): ``'x86'``, ``'fbgemm'``, ``'qnnpack'`` or ``'onednn'``. Default: ``'x86'``.
        freeze_observers (str | float | Time, optional): From this time on, the scales and zero points stay
            fixed. Default: ``None``, observed to the end.
        freeze_bn_stats (str | float | Time, optional): From this time on, BatchNorm running statistics stay
            fixed. Default: ``None``.

    Example:
        .. testcode::

            import torch
            from torch.utils.data import DataLoader, TensorDataset
            from composer import Trainer
            from composer.models import ComposerClassifier
            from composer_kd import Distillation
            from composer_kd.compression import QuantizationAwareTraining, convert_to_int8

            data = TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
            teacher = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
            network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
            student = ComposerClassifier(network, num_classes=3)
            trainer = Trainer(
                model=student,
                train_dataloader=DataLoader(data, batch_size=8),
                max_duration='2ep',
                algorithms=[QuantizationAwareTraining(torch.zeros(1, 8)), Distillation(teacher)],
            )
            trainer.fit()
            int8_student = convert_to_int8(student)
    """

    def __init__(
        self,
        example_inputs: ExampleInputs,
        backend: str = 'x86',
        freeze_observers: Optional[TimeSpec] = None,
        freeze_bn_stats: Optional[TimeSpec] = None,
    ):
        self.example_inputs = example_inputs
        self.backend = _check_backend(backend)
        self.freeze_observers = None if freeze_observers is None else parse_time(freeze_observers, 'freeze_observers')
        self.freeze_bn_stats = None if freeze_bn_stats is None else parse_time(freeze_bn_stats, 'freeze_bn_stats')
        self._paused: list[FakeQuantizeBase] = []

    def __repr__(self) -> str:
        return (
            f'QuantizationAwareTraining(backend={self.backend!r}, freeze_observers={self.freeze_observers}, '
            f'freeze_bn_stats={self.freeze_bn_stats})'
        )

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_START:
            return self.freeze_observers is not None or self.freeze_bn_stats is not None
        return event in (Event.INIT, Event.EVAL_START, Event.EVAL_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state)
        elif event == Event.BATCH_START:
            if self.freeze_observers is not None and reached(to_trainer_time(self.freeze_observers, state), state):
                state.model.apply(torch.ao.quantization.disable_observer)
            if self.freeze_bn_stats is not None and reached(to_trainer_time(self.freeze_bn_stats, state), state):
                state.model.apply(intrinsic_qat.freeze_bn_stats)
        elif event == Event.EVAL_START:
            self._paused = [fq for fq in fake_quantizers(state.model) if bool(fq.observer_enabled[0])]
            for fq in self._paused:
                fq.disable_observer()
        elif event == Event.EVAL_END:
            for fq in self._paused:
                fq.enable_observer()
            self._paused = []

    def _init(self, state: State) -> None:
        model = state.model
        _network(model, "the trainer's model")
        prepared = quantization_backend(model)
        if prepared is not None:
            if prepared != self.backend:
                raise ValueError(f'The model was already prepared for backend {prepared!r}, not {self.backend!r}.')
            return
        if _is_pruned(model):
            names = [n for n, _ in model.named_parameters() if n.endswith('_orig')]
            raise ValueError(
                f'The student is already pruned ({", ".join(names[:3])}): list QuantizationAwareTraining before '
                'Pruning in the algorithms, so the layers pruned are the quantization-aware ones.'
            )
        _prepare_in_place(model, self.example_inputs, self.backend)
