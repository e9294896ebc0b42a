"""Tiny randomly initialised models of several architectures for exactness tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

from shared.kv.model import ModelRunner

VOCAB = 258
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 2048,
    "initializer_range": 0.1,
}

CONFIGS: dict[str, Any] = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, rotary_pct=0.5),
}


def tiny_runner(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> ModelRunner:
    """A ModelRunner over a freshly initialised tiny model of the given architecture."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=dtype)
    return ModelRunner(model, name=f"tiny-{arch}")
