"""What ``composer-kd teacher-signal`` does once its options are read: load the teacher, the student's vocabulary
size and the tokenizer from local folders, and call :func:`~composer_kd.signal.writer.write_teacher_signal`."""

from __future__ import annotations

import json
import os
from typing import Optional

from composer_kd.signal.writer import SignalWriteSummary, write_teacher_signal

__all__ = ['run_teacher_signal', 'student_vocab_size_of']


def student_vocab_size_of(path: str) -> int:
    """The ``vocab_size`` of a Hugging Face model folder or ``config.json`` file."""
    config = os.path.join(path, 'config.json') if os.path.isdir(path) else path
    if not os.path.isfile(config):
        raise FileNotFoundError(f'--student: no config.json at {path}')
    with open(config) as f:
        vocab = json.load(f).get('vocab_size')
    if not isinstance(vocab, int):
        raise ValueError(f'--student: {config} has no integer vocab_size.')
    return vocab


def run_teacher_signal(
    teacher: str,
    tokens: str,
    out: str,
    k: int = 32,
    dtype: str = 'float16',
    batch_size: int = 8,
    sequences_per_part: int = 1024,
    local_dir: Optional[str] = None,
    student: Optional[str] = None,
    student_vocab_size: Optional[int] = None,
    tokenizer: Optional[str] = None,
    device: str = 'cpu',
    progress: bool = True,
) -> SignalWriteSummary:
    """Load a local Hugging Face causal LM teacher and write its signal over ``tokens`` to ``out``.

    Args:
        teacher (str): Folder of a Hugging Face causal LM (``config.json`` and weights).
        tokens (str): Token sequences (see :func:`~composer_kd.signal.writer.load_token_sequences`).
        out (str): Output folder or object-store URI.
        k, dtype, batch_size, sequences_per_part, local_dir, device, progress: As
            :func:`~composer_kd.signal.writer.write_teacher_signal` takes them (``dtype`` is its ``value_dtype``).
        student (str, optional): The student's Hugging Face folder or ``config.json``, for its vocabulary size.
        student_vocab_size (int, optional): The student's vocabulary size, given directly.
        tokenizer (str, optional): The tokenizer folder that made the tokens.

    Returns:
        SignalWriteSummary: What was written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(teacher):
        raise FileNotFoundError(f'--teacher: no such folder: {teacher}')
    model = AutoModelForCausalLM.from_pretrained(teacher, local_files_only=True)
    if student is not None:
        from_student = student_vocab_size_of(student)
        if student_vocab_size is not None and student_vocab_size != from_student:
            raise ValueError(f'--student-vocab-size {student_vocab_size} disagrees with {student} ({from_student}).')
        student_vocab_size = from_student
    tokenizer_size = None
    if tokenizer is not None:
        if not os.path.isdir(tokenizer):
            raise FileNotFoundError(f'--tokenizer: no such folder: {tokenizer}')
        tokenizer_size = len(AutoTokenizer.from_pretrained(tokenizer, local_files_only=True))
    return write_teacher_signal(
        model,
        tokens,
        out,
        k,
        value_dtype=dtype,
        batch_size=batch_size,
        sequences_per_part=sequences_per_part,
        local_dir=local_dir,
        student_vocab_size=student_vocab_size,
        tokenizer_size=tokenizer_size,
        device=device,
        progress=progress,
    )
