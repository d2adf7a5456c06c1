"""Knowledge distillation for MosaicML Composer: add ``Distillation`` to a Trainer's algorithms."""

from composer_kd.distillation import (
    Distillation,
    average_logits,
    combine_losses,
    distillation_loss,
    sample_teachers,
)
from composer_kd.losses import KLDivergence, kl_divergence
from composer_kd.teachers import load_teacher_checkpoint

__all__ = [
    'Distillation',
    'KLDivergence',
    'average_logits',
    'combine_losses',
    'distillation_loss',
    'kl_divergence',
    'load_teacher_checkpoint',
    'sample_teachers',
]

__version__ = '0.1.0'
