"""Tiny models the tests build from configs (no weights are downloaded), shared by test modules and by the scripts
the multi-process tests launch (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_gpt2(layers: int, width: int, seed: int, *, vocab: int, positions: int = 32, **config: Any) -> GPT2LMHeadModel:
    """A GPT-2 of ``layers`` blocks, ``width`` wide with 2 heads, its weights drawn from ``seed``, and without
    dropout, so that runs that split a batch differently (ranks, microbatches, resumes) compute the same thing.

    Args:
        layers (int): Transformer blocks.
        width (int): Embedding width.
        seed (int): Seeds torch's generator before the weights are drawn.
        vocab (int): Vocabulary size.
        positions (int, optional): Longest sequence. Default: ``32``.
        **config: Further ``GPT2Config`` fields (``pad_token_id``, ``tie_word_embeddings``, ...).
    """
    torch.manual_seed(seed)
    dropout_off = {'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0}
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=2, **{**dropout_off, **config}
        )
    )
