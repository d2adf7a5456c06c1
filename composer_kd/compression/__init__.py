"""Compressing a distilled student: quantization-aware training to int8, and magnitude pruning.

Each has a functional core that never changes the model it is given (:func:`prepare_qat`,
:func:`convert_to_int8`, :func:`prune_model`, :func:`make_pruning_permanent`) and a Composer algorithm that
compresses the trainer's student during a fit (:class:`QuantizationAwareTraining`, :class:`Pruning`), so it
composes with ``Distillation`` in one ``Trainer``. Teachers are never quantized or pruned. See
``docs/compression.md``.
"""

from composer_kd.compression.pruning import (
    PRUNABLE_TYPES,
    Pruning,
    copy_model,
    make_pruning_permanent,
    prunable_modules,
    prune_model,
    pruning_masks,
    sparsity,
)
from composer_kd.compression.quantization import (
    QAT_BACKENDS,
    QuantizationAwareTraining,
    calibrate,
    convert_to_int8,
    fake_quantizers,
    prepare_qat,
    quantization_backend,
    quantized_engine,
)
from composer_kd.compression.size import model_size_bytes

__all__ = [
    'PRUNABLE_TYPES',
    'QAT_BACKENDS',
    'Pruning',
    'QuantizationAwareTraining',
    'calibrate',
    'convert_to_int8',
    'copy_model',
    'fake_quantizers',
    'make_pruning_permanent',
    'model_size_bytes',
    'prepare_qat',
    'prunable_modules',
    'prune_model',
    'pruning_masks',
    'quantization_backend',
    'quantized_engine',
    'sparsity',
]
