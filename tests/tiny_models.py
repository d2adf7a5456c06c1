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


def tiny_llama(width: int, seed: int, *, vocab: int, **config: Any) -> Any:
    """A one-block Llama ``width`` wide with 2 heads and an untied output layer, its weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = {
        'vocab_size': vocab, 'hidden_size': width, 'intermediate_size': 2 * width, 'num_hidden_layers': 1,
        'num_attention_heads': 2, 'num_key_value_heads': 2, 'max_position_embeddings': 32,
        'tie_word_embeddings': False,
    }  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config}))


def tiny_mpt(width: int, seed: int, *, vocab: int, tied: bool = False, **config: Any) -> Any:
    """llm-foundry's ComposerMPTCausalLM with one block, ``width`` wide, on the CPU (torch attention and
    cross-entropy, no dropout); untied, llm-foundry marks its ``lm_head`` as an FSDP unit of its own."""
    from llmfoundry.models.mpt import ComposerMPTCausalLM

    torch.manual_seed(seed)
    fields = {
        'd_model': width, 'n_heads': 2, 'n_layers': 1, 'max_seq_len': 32, 'vocab_size': vocab, 'expansion_ratio': 2,
        'attn_config': {'attn_impl': 'torch'}, 'tie_word_embeddings': tied, 'init_device': 'cpu', 'resid_pdrop': 0.0,
        'emb_pdrop': 0.0, 'loss_fn': 'torch_crossentropy',
    }  # fmt: skip
    return ComposerMPTCausalLM(**{**fields, **config})
