"""What ``composer-kd teacher-signal`` does once its options are read: load the teacher, the student's vocabulary
size and the tokenizer from local folders, and call :func:`~composer_kd.signal.writer.write_teacher_signal`.

The teacher is loaded exactly as its folder describes it, or refused: a folder that ships its own model code (an
``auto_map`` in its ``config.json``, as llm-foundry's ``hf_checkpointer`` writes an MPT) is run with that code only
when ``trust_remote_code`` says so, and a weight of the folder that the model leaves unused, or a weight of the model
that the folder lacks, is an error naming it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from composer_kd.models.rng import preserved_rng
from composer_kd.signal.writer import SignalWriteSummary, write_teacher_signal

__all__ = ['load_teacher', 'run_teacher_signal', 'student_vocab_size_of']

#: Keys of ``from_pretrained``'s loading information that must be empty, and what each means.
_LOADING_PROBLEMS = {
    'unexpected_keys': 'weights in the folder that the model leaves unused',
    'missing_keys': 'weights of the model that the folder lacks (left at their random initialization)',
    'mismatched_keys': "weights whose shape differs from the model's",
    'error_msgs': 'errors',
}
_NAMED = 20


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


def _read_config(teacher: str) -> dict[str, Any]:
    path = os.path.join(teacher, 'config.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--teacher: no config.json in {teacher}: give a Hugging Face model folder.')
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f'--teacher: {path} is not a JSON object.')
    return config


def _names(values: Any) -> str:
    values = [str(v) for v in values]
    more = f' and {len(values) - _NAMED} more' if len(values) > _NAMED else ''
    return ', '.join(values[:_NAMED]) + more


def load_teacher(teacher: str, trust_remote_code: bool = False) -> Any:
    """Load the causal LM in the local folder ``teacher`` as it was saved, or refuse it.

    A folder whose ``config.json`` has an ``auto_map`` ships the code of its own model (llm-foundry's
    ``hf_checkpointer`` writes an MPT so, with ``modeling_mpt.py`` and the files it imports): without that code
    ``transformers`` would build its own class for the ``model_type``, which for llm-foundry's MPT leaves every bias
    and the position embedding unused and attends differently. Such a folder is loaded with its code when
    ``trust_remote_code`` is true (its Python files are then run), and refused otherwise. Every weight of the folder
    must then be used and every weight of the model found, with its shape. The folder is only read; the random
    generators are left as they were.

    Args:
        teacher (str): The folder (``config.json`` and weights).
        trust_remote_code (bool, optional): Run the model code the folder ships. Default: ``False``.

    Returns:
        transformers.PreTrainedModel: The teacher.

    Raises:
        FileNotFoundError: If the folder or its ``config.json`` does not exist.
        ValueError: If the folder ships model code and ``trust_remote_code`` is false, or the model's weights and
            the folder's differ (the message names them), or the weights cannot be loaded into the model.
    """
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(teacher):
        raise FileNotFoundError(f'--teacher: no such folder: {teacher}')
    config = _read_config(teacher)
    auto_map = config.get('auto_map') or {}
    if auto_map and not trust_remote_code:
        code = sorted({f'{str(target).split(".")[0]}.py' for target in auto_map.values()})
        raise ValueError(
            f'--teacher: {teacher} ships the code of its own model (config.json auto_map: {auto_map}; {_names(code)}), '
            f"as llm-foundry's hf_checkpointer saves an MPT. Without it, transformers would build its own "
            f'{config.get("model_type")!r} model, which need not compute what the teacher was trained to compute. '
            'Give --trust-remote-code (trust_remote_code: true in the options file) to load it with its code, which '
            'runs the Python files of the folder: do so only for a folder you trust.'
        )
    try:
        with preserved_rng():
            model, info = AutoModelForCausalLM.from_pretrained(
                teacher, local_files_only=True, trust_remote_code=trust_remote_code, output_loading_info=True
            )
    except (RuntimeError, OSError) as error:
        raise ValueError(f'--teacher: {teacher} cannot be loaded as a causal LM: {error}') from error
    problems = [
        f'{len(info[key])} {meaning}: {_names(info[key])}'
        for key, meaning in _LOADING_PROBLEMS.items()
        if info.get(key)
    ]
    if problems:
        raise ValueError(
            f'--teacher: {teacher} does not load as it was saved into {type(model).__name__} '
            f'({type(model).__module__}): {"; ".join(problems)}. Its weights and its model must match exactly: '
            'distilling from this model would teach something other than the teacher.'
        )
    return model


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
    trust_remote_code: bool = False,
) -> SignalWriteSummary:
    """Load a local Hugging Face causal LM teacher and write its signal over ``tokens`` to ``out``.

    Args:
        teacher (str): Folder of a Hugging Face causal LM (``config.json`` and weights), loaded by
            :func:`load_teacher`.
        tokens (str): Token sequences (see :func:`~composer_kd.signal.writer.load_token_sequences`).
        out (str): Output folder or object-store URI.
        k, dtype, batch_size, sequences_per_part, local_dir, device, progress: As
            :func:`~composer_kd.signal.writer.write_teacher_signal` takes them (``dtype`` is its ``value_dtype``).
        student (str, optional): The student's Hugging Face folder or ``config.json``, for its vocabulary size.
        student_vocab_size (int, optional): The student's vocabulary size, given directly.
        tokenizer (str, optional): The tokenizer folder that made the tokens.
        trust_remote_code (bool, optional): Load a teacher folder that ships its own model code with that code
            (see :func:`load_teacher`). Default: ``False``, such a folder is refused.

    Returns:
        SignalWriteSummary: What was written.
    """
    from transformers import AutoTokenizer

    model = load_teacher(teacher, trust_remote_code=trust_remote_code)
    if student is not None:
        from_student = student_vocab_size_of(student)
        if student_vocab_size is not None and student_vocab_size != from_student:
            raise ValueError(f'--student-vocab-size {student_vocab_size} disagrees with {student} ({from_student}).')
        student_vocab_size = from_student
    tokenizer_size, loaded_tokenizer = None, None
    if tokenizer is not None:
        if not os.path.isdir(tokenizer):
            raise FileNotFoundError(f'--tokenizer: no such folder: {tokenizer}')
        loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        tokenizer_size = len(loaded_tokenizer)
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
        tokenizer=loaded_tokenizer,  # its fingerprint is recorded with the teacher's
        device=device,
        progress=progress,
    )
