"""Tiny configs of HF causal-LM architectures, for tests, the demo and the architecture table.

Each builds with hidden 64, 4 attention heads (2 kv heads where the arch has GQA), 2 layers,
intermediate 128, vocab 256; `tiny_config(arch, **overrides)` changes any of them.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "helium", "stablelm")


def _llama_style(hidden, layers, heads, kv_heads, intermediate, vocab, positions):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                max_position_embeddings=positions)


# extra keywords per model type, beyond the llama-style ones
_EXTRA = {
    "llama": {}, "qwen2": {}, "granite": {},
    "mistral": {"head_dim": None}, "qwen3": {"head_dim": None}, "gemma": {"head_dim": None},
    "helium": {"head_dim": None},
    "gemma2": {"head_dim": None, "query_pre_attn_scalar": None, "sliding_window": 8},
    "olmo": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "stablelm": {"bos_token_id": 1, "eos_token_id": 2},
}


def tiny_config(arch: str, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vocab: int = 256, positions: int = 128):
    if arch not in _EXTRA:
        raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(sorted(_EXTRA))}")
    head_dim = hidden // heads
    extra = {k: (head_dim if v is None else v) for k, v in _EXTRA[arch].items()}
    return AutoConfig.for_model(arch, **_llama_style(hidden, layers, heads, kv_heads, intermediate, vocab, positions), **extra)


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    return model.float().eval()


# Real model shapes (no weights): for memory and speed measurements on meta or random weights.
REAL_SHAPES = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=8192, rope_theta=500000.0)),
    "llama3-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=8192, rope_theta=500000.0)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
}


def real_config(name: str, layers: int | None = None):
    """The config of a real model shape, optionally with fewer layers (to fit a test's time)."""
    if name not in REAL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(sorted(REAL_SHAPES))}")
    model_type, kwargs = REAL_SHAPES[name]
    if layers is not None:
        kwargs = {**kwargs, "num_hidden_layers": layers}
    return AutoConfig.for_model(model_type, **kwargs)
