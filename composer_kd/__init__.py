"""Knowledge distillation for MosaicML Composer: add ``Distillation`` to a Trainer's algorithms.

Every exported name is imported from its module the first time it is used (see :mod:`composer_kd.lazy`), so
``import composer_kd`` is quick and loads neither torch nor Composer; ``from composer_kd import Distillation``
works as ever.
"""

import sys
from typing import TYPE_CHECKING

from composer_kd.lazy import ModuleAliases, lazy_exports

if TYPE_CHECKING:  # the names as type checkers and editors see them
    from composer_kd import compression
    from composer_kd.cache import (
        IndexedDataset,
        StaleTeacherCacheError,
        TeacherCache,
        indexed_collate,
        topk_compress,
        topk_logits,
    )
    from composer_kd.compression import (
        Pruning,
        QuantizationAwareTraining,
        calibrate,
        convert_to_int8,
        make_pruning_permanent,
        model_size_bytes,
        prepare_qat,
        prune_model,
        sparsity,
    )
    from composer_kd.distillation import Distillation
    from composer_kd.losses import (
        LOSSES,
        CosineDistance,
        DecoupledKD,
        GeneralizedJSD,
        JensenShannonDivergence,
        KLDivergence,
        LogitsMSE,
        ReverseKLDivergence,
        SkewKLDivergence,
        SkewReverseKLDivergence,
        SoftCrossEntropy,
        Standardized,
        chunked_kl_divergence,
        cosine_distance,
        decoupled_kd,
        generalized_jsd,
        get_loss,
        jensen_shannon_divergence,
        kl_divergence,
        logits_mse,
        reverse_kl_divergence,
        skew_kl_divergence,
        skew_reverse_kl_divergence,
        soft_cross_entropy,
        standardize_logits,
    )
    from composer_kd.losses.fused import fused_linear_distillation
    from composer_kd.losses.objective import CombinedLoss, combine_losses, distillation_loss
    from composer_kd.models.checkpoints import load_teacher_checkpoint
    from composer_kd.models.student_init import student_from_teacher_layers
    from composer_kd.models.teachers import TeacherInference, average_logits, sample_teachers
    from composer_kd.multitask import DistillationTask, MultiTaskClassifier, TaskAccuracy, task_distillations
    from composer_kd.parts.features import FeaturePair
    from composer_kd.parts.fused import Fused
    from composer_kd.parts.onpolicy import OnPolicy
    from composer_kd.run.api import DistillResult, distill
    from composer_kd.schedules import ConstantSchedule, CosineSchedule, LinearSchedule, Schedule
    from composer_kd.signal.distill import TeacherSignal

__all__ = [
    'LOSSES',
    'ConstantSchedule',
    'CosineSchedule',
    'LinearSchedule',
    'Pruning',
    'QuantizationAwareTraining',
    'Schedule',
    'CombinedLoss',
    'CosineDistance',
    'DecoupledKD',
    'DistillResult',
    'Distillation',
    'DistillationTask',
    'FeaturePair',
    'IndexedDataset',
    'JensenShannonDivergence',
    'KLDivergence',
    'LogitsMSE',
    'MultiTaskClassifier',
    'ReverseKLDivergence',
    'SoftCrossEntropy',
    'Standardized',
    'StaleTeacherCacheError',
    'TeacherCache',
    'TaskAccuracy',
    'TeacherInference',
    'average_logits',
    'calibrate',
    'chunked_kl_divergence',
    'combine_losses',
    'compression',
    'convert_to_int8',
    'cosine_distance',
    'decoupled_kd',
    'distill',
    'distillation_loss',
    'get_loss',
    'indexed_collate',
    'jensen_shannon_divergence',
    'kl_divergence',
    'load_teacher_checkpoint',
    'logits_mse',
    'make_pruning_permanent',
    'model_size_bytes',
    'prepare_qat',
    'prune_model',
    'reverse_kl_divergence',
    'sample_teachers',
    'soft_cross_entropy',
    'sparsity',
    'standardize_logits',
    'student_from_teacher_layers',
    'topk_compress',
    'topk_logits',
    'task_distillations',
    # Divergences for on-policy distillation of generative models.
    'GeneralizedJSD',
    'SkewKLDivergence',
    'SkewReverseKLDivergence',
    'generalized_jsd',
    'skew_kl_divergence',
    'skew_reverse_kl_divergence',
    'OnPolicy',
    'TeacherSignal',
    # Distillation of language models without their logits: the output layer fused with the loss.
    'Fused',
    'fused_linear_distillation',
]

_EXPORTED_FROM = {
    'composer_kd.compression': (
        'compression',
        'Pruning',
        'QuantizationAwareTraining',
        'calibrate',
        'convert_to_int8',
        'make_pruning_permanent',
        'model_size_bytes',
        'prepare_qat',
        'prune_model',
        'sparsity',
    ),
    'composer_kd.run.api': ('DistillResult', 'distill'),
    'composer_kd.cache': (
        'IndexedDataset',
        'StaleTeacherCacheError',
        'TeacherCache',
        'indexed_collate',
        'topk_compress',
        'topk_logits',
    ),
    'composer_kd.distillation': ('Distillation',),
    'composer_kd.losses.objective': ('CombinedLoss', 'combine_losses', 'distillation_loss'),
    'composer_kd.parts.features': ('FeaturePair',),
    'composer_kd.losses': (
        'LOSSES',
        'CosineDistance',
        'DecoupledKD',
        'JensenShannonDivergence',
        'KLDivergence',
        'LogitsMSE',
        'ReverseKLDivergence',
        'SoftCrossEntropy',
        'Standardized',
        'chunked_kl_divergence',
        'cosine_distance',
        'decoupled_kd',
        'get_loss',
        'jensen_shannon_divergence',
        'kl_divergence',
        'logits_mse',
        'reverse_kl_divergence',
        'soft_cross_entropy',
        'standardize_logits',
        # Divergences for on-policy distillation of generative models.
        'GeneralizedJSD',
        'SkewKLDivergence',
        'SkewReverseKLDivergence',
        'generalized_jsd',
        'skew_kl_divergence',
        'skew_reverse_kl_divergence',
    ),
    'composer_kd.multitask': ('DistillationTask', 'MultiTaskClassifier', 'TaskAccuracy', 'task_distillations'),
    'composer_kd.schedules': ('ConstantSchedule', 'CosineSchedule', 'LinearSchedule', 'Schedule'),
    'composer_kd.models.student_init': ('student_from_teacher_layers',),
    'composer_kd.models.teachers': ('TeacherInference', 'average_logits', 'sample_teachers'),
    'composer_kd.models.checkpoints': ('load_teacher_checkpoint',),
    'composer_kd.parts.onpolicy': ('OnPolicy',),
    'composer_kd.signal.distill': ('TeacherSignal',),
    'composer_kd.losses.fused': ('fused_linear_distillation',),
    'composer_kd.parts.fused': ('Fused',),
}
#: Where each exported name lives: ``{name: module}``.
EXPORTS = {name: module for module, names in _EXPORTED_FROM.items() for name in names}

__getattr__, __dir__ = lazy_exports(__name__, EXPORTS, globals())

#: Modules' former paths, each importing the module where it lives now (the folders are described in
#: ``docs/architecture.md``).
FORMER_PATHS = {
    f'composer_kd.{former}': f'composer_kd.{current}'
    for former, current in {
        'adapters': 'run.adapters',
        'api': 'run.api',
        'checkpoints': 'models.checkpoints',
        'data': 'recipes.data',
        'demo': 'cli.demo',
        'feature_losses': 'losses.features',
        'features': 'parts.features',
        'fused': 'losses.fused',
        'fused_distillation': 'parts.fused',
        'nonfinite': 'parts.guard',
        'objective': 'losses.objective',
        'onpolicy': 'parts.onpolicy',
        'outputs': 'models.outputs',
        'reporting': 'run.reporting',
        'search': 'run.search',
        'signal.command': 'cli.teacher_signal',
        'signal.loss': 'losses.signal',
        'speed': 'models.speed',
        'student_init': 'models.student_init',
        'teachers': 'models.teachers',
        'text_data': 'recipes.text_data',
        'training': 'run.training',
    }.items()
}
if not any(isinstance(finder, ModuleAliases) for finder in sys.meta_path):
    sys.meta_path.append(ModuleAliases(FORMER_PATHS))

__version__ = '0.1.0'
