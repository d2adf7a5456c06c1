"""The offline teacher signal: each position's top-k teacher logits and remaining probability mass, written once
to MosaicML Streaming shards and read back in place of a live teacher.

- :mod:`~composer_kd.signal.encoding`: the stored form (low-precision logits, bit-packed indices, log tail mass);
- :mod:`~composer_kd.losses.signal`: the KL term from a stored signal and the student's logits;
- :mod:`~composer_kd.signal.shards`: the MDS columns, :class:`~composer_kd.signal.shards.SignalDataset`, collate;
- :mod:`~composer_kd.signal.writer`: running the teacher once and writing the shards, resumably;
- :mod:`~composer_kd.signal.distill`: :class:`~composer_kd.signal.distill.TeacherSignal`, what
  :class:`~composer_kd.Distillation` takes in place of teachers.

Only the encoding, the loss and :class:`TeacherSignal` load with this package; the shards and the writer import
MosaicML Streaming when they are imported themselves.
"""

from composer_kd.losses.signal import signal_kl, signal_kl_per_position
from composer_kd.signal.distill import TeacherSignal
from composer_kd.signal.encoding import bits_per_index, bytes_per_token, decode_signal, encode_signal

__all__ = [
    'TeacherSignal',
    'bits_per_index',
    'bytes_per_token',
    'decode_signal',
    'encode_signal',
    'signal_kl',
    'signal_kl_per_position',
]
