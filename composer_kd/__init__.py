"""Knowledge distillation for MosaicML Composer: add ``Distillation`` to a Trainer's algorithms."""

from composer_kd import compression
from composer_kd.api import DistillResult, distill
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
from composer_kd.distillation import (
    CombinedLoss,
    Distillation,
    average_logits,
    combine_losses,
    distillation_loss,
    sample_teachers,
)
from composer_kd.features import FeaturePair
from composer_kd.losses import (
    LOSSES,
    CosineDistance,
    JensenShannonDivergence,
    KLDivergence,
    LogitsMSE,
    ReverseKLDivergence,
    SoftCrossEntropy,
    chunked_kl_divergence,
    cosine_distance,
    get_loss,
    jensen_shannon_divergence,
    kl_divergence,
    logits_mse,
    reverse_kl_divergence,
    soft_cross_entropy,
)
from composer_kd.multitask import DistillationTask, MultiTaskClassifier, TaskAccuracy, task_distillations
from composer_kd.schedules import ConstantSchedule, CosineSchedule, LinearSchedule, Schedule
from composer_kd.student_init import student_from_teacher_layers
from composer_kd.teachers import TeacherInference, load_teacher_checkpoint

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
    'student_from_teacher_layers',
    'topk_compress',
    'topk_logits',
    'task_distillations',
]

__version__ = '0.1.0'
