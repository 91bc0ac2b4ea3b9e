"""Tiny configs of HF architectures (causal LMs, seq2seq LMs, encoders), for tests, the demo and
the architecture table.

Each builds with hidden 64, 4 attention heads (2 kv heads where the arch has GQA), 2 layers,
intermediate 128, vocab 256; `tiny_config(arch, **overrides)` changes any of them. The keyword
names differ a lot between model types; the builders below are the one place that knows them.
"""
from __future__ import annotations

import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "helium", "stablelm")
CAUSAL_LMS = LLAMA_FAMILY + (
    "gpt2", "opt", "bloom", "gpt_neox", "falcon", "mixtral", "phi", "phi3", "gptj", "codegen",
    "gpt_bigcode", "olmo2", "starcoder2", "mpt", "cohere", "persimmon", "qwen2_moe", "gpt_neo",
    "xglm", "biogpt", "exaone4", "glm", "smollm3",
)
SEQ2SEQ_LMS = ("t5", "mt5", "bart", "marian")
ENCODERS = ("bert", "roberta", "deberta-v2", "electra")


def _llama_style(h, layers, heads, kv, inter, vocab, pos):
    return dict(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=inter, vocab_size=vocab, max_position_embeddings=pos)


def _t5_style(h, layers, heads, kv, inter, vocab, pos):
    return dict(d_model=h, d_kv=h // heads, d_ff=inter, num_layers=layers, num_decoder_layers=layers,
                num_heads=heads, vocab_size=vocab, relative_attention_num_buckets=8,
                relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _bart_style(h, layers, heads, kv, inter, vocab, pos):
    return dict(d_model=h, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                decoder_attention_heads=heads, encoder_ffn_dim=inter, decoder_ffn_dim=inter, vocab_size=vocab,
                max_position_embeddings=pos, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                decoder_start_token_id=2)


def _bert_style(h, layers, heads, kv, inter, vocab, pos):
    return dict(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                vocab_size=vocab, max_position_embeddings=pos)


def _gpt2_style(h, layers, heads, kv, inter, vocab, pos):
    return dict(n_embd=h, n_layer=layers, n_head=heads, n_inner=inter, vocab_size=vocab, n_positions=pos,
                bos_token_id=1, eos_token_id=2)


_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model type -> (keyword builder, extra keywords); None in extras means "the head dim"
_KEYWORDS = {
    **{arch: (_llama_style, {}) for arch in ("llama", "qwen2", "granite", "phi")},
    **{arch: (_llama_style, {"head_dim": None}) for arch in ("mistral", "qwen3", "gemma", "helium")},
    "gemma2": (_llama_style, {"head_dim": None, "query_pre_attn_scalar": None, "sliding_window": 8}),
    "olmo": (_llama_style, _IDS), "olmo2": (_llama_style, _IDS), "phi3": (_llama_style, _IDS),
    "cohere": (_llama_style, _IDS), "smollm3": (_llama_style, _IDS),
    "stablelm": (_llama_style, {"bos_token_id": 1, "eos_token_id": 2}),
    "starcoder2": (_llama_style, {"bos_token_id": 1, "eos_token_id": 2}),
    "mixtral": (_llama_style, {"head_dim": None, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (_llama_style, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                 "shared_expert_intermediate_size": 128}),
    "exaone4": (_llama_style, {"sliding_window": 8, "sliding_window_pattern": 2, "bos_token_id": 1, "eos_token_id": 2}),
    "glm": (_llama_style, {"head_dim": None, "pad_token_id": 0, "eos_token_id": 2}),
    **{arch: (_t5_style, {}) for arch in ("t5", "mt5")},
    **{arch: (_bart_style, {}) for arch in ("bart", "marian")},
    **{arch: (_bert_style, {}) for arch in ENCODERS},
    "gpt2": (_gpt2_style, {}),
    "gpt_bigcode": (_gpt2_style, {}),  # multi_query=True by default: one kv head (StarCoder-1)
    "gptj": (_gpt2_style, {"rotary_dim": 8}),
    "codegen": (_gpt2_style, {"rotary_dim": 8, "n_ctx": None}),
    "opt": (lambda h, layers, heads, kv, inter, vocab, pos: dict(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=inter, word_embed_proj_dim=h,
        vocab_size=vocab, max_position_embeddings=pos, pad_token_id=1, bos_token_id=2, eos_token_id=2), {}),
    "bloom": (lambda h, layers, heads, kv, inter, vocab, pos: dict(  # MLP is fixed at 4 * hidden
        hidden_size=h, n_layer=layers, n_head=heads, vocab_size=vocab), {}),
    "gpt_neox": (lambda h, layers, heads, kv, inter, vocab, pos: dict(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
        vocab_size=vocab, max_position_embeddings=pos), {}),
    "persimmon": (lambda h, layers, heads, kv, inter, vocab, pos: dict(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
        vocab_size=vocab, max_position_embeddings=pos), {}),
    "biogpt": (lambda h, layers, heads, kv, inter, vocab, pos: dict(
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
        vocab_size=vocab, max_position_embeddings=pos), {}),
    "falcon": (lambda h, layers, heads, kv, inter, vocab, pos: dict(  # falcon-40b style: real GQA
        hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_kv_heads=kv,
        new_decoder_architecture=True, multi_query=False, ffn_hidden_size=inter, vocab_size=vocab,
        max_position_embeddings=pos, bos_token_id=1, eos_token_id=2), {}),
    "mpt": (lambda h, layers, heads, kv, inter, vocab, pos: dict(
        d_model=h, n_layers=layers, n_heads=heads, expansion_ratio=inter // h, max_seq_len=pos,
        vocab_size=vocab), {}),
    "gpt_neo": (lambda h, layers, heads, kv, inter, vocab, pos: dict(
        hidden_size=h, num_layers=layers, num_heads=heads, intermediate_size=inter,
        attention_types=[[["global", "local"], layers // 2]] if layers % 2 == 0 else [[["global"], layers]],
        window_size=8, vocab_size=vocab,
        max_position_embeddings=pos, bos_token_id=1, eos_token_id=2), {}),
    "xglm": (lambda h, layers, heads, kv, inter, vocab, pos: dict(
        d_model=h, num_layers=layers, attention_heads=heads, ffn_dim=inter, vocab_size=vocab,
        max_position_embeddings=pos), {}),
}


def tiny_config(arch: str, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vocab: int = 256, positions: int = 128):
    if arch not in _KEYWORDS:
        raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(sorted(_KEYWORDS))}")
    build, extra = _KEYWORDS[arch]
    head_dim = hidden // heads
    fill = {"head_dim": head_dim, "query_pre_attn_scalar": head_dim, "n_ctx": positions}
    extra = {k: (fill[k] if v is None else v) for k, v in extra.items()}
    return AutoConfig.for_model(arch, **build(hidden, layers, heads, kv_heads, intermediate, vocab, positions), **extra)


def tiny_model(arch: str, seed: int = 0, auto_class=None, noise: float = 0.0, **overrides) -> torch.nn.Module:
    """A tiny model with random weights; `auto_class` defaults to AutoModelForCausalLM, and to
    AutoModelForSeq2SeqLM / AutoModelForMaskedLM for seq2seq LMs / encoders. `noise`: the std of
    Gaussian noise added to every parameter, so that rows and greedy choices differ clearly."""
    if auto_class is None:
        auto_class = AutoModelForSeq2SeqLM if arch in SEQ2SEQ_LMS else \
            AutoModelForMaskedLM if arch in ENCODERS else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto_class.from_config(tiny_config(arch, **overrides), dtype=torch.float32).float().eval()
    if noise:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * noise)
    return model


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
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                     num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6)),
}


def real_config(name: str, layers: int | None = None):
    """The config of a real model shape, optionally with fewer layers (to fit a test's time)."""
    if name not in REAL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(sorted(REAL_SHAPES))}")
    model_type, kwargs = REAL_SHAPES[name]
    if layers is not None:
        kwargs = {**kwargs, "num_hidden_layers": layers}
    return AutoConfig.for_model(model_type, **kwargs)


# Generic shrinking for model types without a builder above (benchmarks/sweep_model_types.py):
# config attribute names that mean the same size across model types, and the tiny value each gets.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads")
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_n_heads", "multi_query_group_num")
_TINY_SIZES = {
    64: ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "model_dim", "word_embed_proj_dim"),
    2: _LAYER_KEYS + _KV_HEAD_KEYS + ("num_experts_per_tok", "moe_top_k", "moe_topk", "num_experts_per_token", "moe_k"),
    4: _HEAD_KEYS + ("num_experts",
        "num_local_experts", "n_routed_experts", "moe_num_experts"),
    # an SSM's state size too: left at its default (64-256) against an expanded hidden size of 128,
    # Mamba-2's B and C (whole where one group shares them) outweighed what shards
    16: ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "state_size", "ssm_state_size",
         "mamba_d_state"),
    32: ("kv_lora_rank", "q_lora_rank"),
    128: ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff"),
    48: ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
         "expert_intermediate_size"),
    1: ("n_group", "topk_group", "n_shared_experts", "num_shared_experts"),
    256: ("vocab_size",),
}
_TINY_OF = {name: size for size, names in _TINY_SIZES.items() for name in names}
# Per model type, what the shrinking cannot derive: sizes whose default is None, per-layer values the cut to
# 2 layers leaves inconsistent, defaults the config class's own validation rejects (a dict merges into a
# sub-config's).
_TYPE_FIXES = {
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # DbrxAttention reads both; no defaults
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "zaya": {"num_experts_per_tok": 1},  # the only top-k ZAYA supports
    "lfm2_moe": {"layer_types": ["full_attention", "conv"], "num_dense_layers": 1},  # one attention, one MoE layer
    "olmo_hybrid": {"layer_types": ["linear_attention", "full_attention"]},  # the first 2 are both linear
    "gemma3n_text": {"layer_types": ["sliding_attention", "full_attention"], "num_kv_shared_layers": 0,
                     "intermediate_size": [128, 128],  # per layer
                     "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16},  # else 134M per-layer inputs
    "cohere_compass_text": {"rope_parameters": {t: {"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [3, 3, 2]}  # of the 16-dim heads' 8 frequencies
                                                for t in ("full_attention", "sliding_attention")}},
    "dots3_note_text": {"index_n_heads": 4, "index_head_dim": 32},
    "gemma4_text": {"vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16},  # else 134M
    "blt": {"encoder_hash_byte_group_vocab": 256, **{f"{part}_config": {"hidden_size_global": 64}
                                                      for part in ("encoder", "decoder")}},  # the global model's
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
}
# Mamba-2 mixers' SSM heads by the names each model type gives them: (heads, head dim, expansion of the
# hidden size, groups sharing B and C, the SSM's inner width where the config has one)
_SSM_HEADS = (("num_heads", "head_dim", "expand", "n_groups", None),                                # mamba2
              ("mamba_n_heads", "mamba_d_head", "mamba_expand", "mamba_n_groups", "mamba_d_ssm"),   # bamba, falcon_h1, granitemoehybrid
              ("mamba_num_heads", "mamba_head_dim", "expand", "n_groups", None),                    # nemotron_h
              ("n_mamba_heads", "mamba_headdim", "mamba_expand", "mamba_ngroups", None))            # zamba2
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1}
MULTIMODAL_KEYS = ("text_config", "vision_config", "audio_config", "vq_config", "speech_config")


def generic_tiny_config(model_type: str):
    """A tiny config of any model type, from its defaults: every size attribute named in
    _TINY_SIZES (also inside sub-config dicts) shrunk, token ids kept inside the 256-word vocab
    and per-layer lists and dicts (by layer index) cut to the first 2 layers; kv heads as many as the
    heads where the default has as many or None (multi-head and MLA attention stay so); a head_dim
    left None made explicit; then the type's _TYPE_FIXES.
    Raises what the config class raises if the shrunk sizes are inconsistent for it."""
    fixes = _TYPE_FIXES.get(model_type, {})
    # a sub-config's fixes apply to the default too: some defaults fail their own validation
    sub_configs = getattr(CONFIG_MAPPING[model_type], "sub_configs", {})
    default = AutoConfig.for_model(model_type, **{k: v for k, v in fixes.items() if k in sub_configs}).to_dict()
    layers = next((default[k] for k in _LAYER_KEYS if isinstance(default.get(k), int)), None)
    heads = next((default[k] for k in _HEAD_KEYS if isinstance(default.get(k), int)), None)
    shrunk = _shrunk(default, layers, heads)
    for key, value in fixes.items():
        shrunk[key] = _sub_config({**shrunk.get(key, default[key]), **value}) if isinstance(value, dict) and value \
            else value
    for heads, head_dim, expand, groups, inner in _SSM_HEADS:
        sizes = [default.get(k) for k in ("hidden_size", expand, heads, head_dim)]
        if not all(type(size) is int and size > 0 for size in sizes):
            continue
        hidden, factor, count, dim = sizes
        if hidden * factor != count * dim and default.get(inner) != count * dim:
            continue  # the SSM heads tile the expanded hidden size (Falcon-H1: a mamba_d_ssm of its own)
        # as many SSM heads as attention heads, of the width that tiles the shrunk expanded hidden size:
        # 128 heads of 1 feature would make the reference scan's [chunk, chunk, heads, state] products huge
        shrunk[heads] = _TINY_OF["num_attention_heads"]
        shrunk[head_dim] = shrunk["hidden_size"] * factor // shrunk[heads]
        if inner in default:
            shrunk[inner] = shrunk[heads] * shrunk[head_dim]
        if default.get(groups, 1) > 1:  # groups of heads sharing B and C
            shrunk[groups] = math.gcd(default[groups], shrunk[heads])
    return AutoConfig.for_model(model_type, **shrunk)


def _sub_config(values: dict) -> dict:
    """A sub-config's to_dict() as its class's keywords: without the bookkeeping every to_dict() writes at
    its default, which transformers 5.17's DBRX sub-configs reject as unknown keywords."""
    at_default = {"_name_or_path": "", "output_attentions": False}
    return {k: v for k, v in values.items() if k not in at_default or v != at_default[k]}


def _shrunk(values: dict, layers, heads) -> dict:
    changed = {}
    for key, value in values.items():
        if key in _KV_HEAD_KEYS and (value == heads or value is None):  # None: as many as the heads
            changed[key] = _TINY_OF["num_attention_heads"]
        elif key in _TINY_OF and isinstance(value, int) and not isinstance(value, bool):
            changed[key] = _TINY_OF[key]
        elif key in _TOKEN_IDS and isinstance(value, int) and value >= _TINY_OF["vocab_size"]:
            changed[key] = _TOKEN_IDS[key]
        elif key == "head_dim" and value is None:  # None: hidden // heads, which the shrunk sizes make 16
            changed[key] = _TINY_OF["head_dim"]
        elif isinstance(value, list) and layers and len(value) == layers > 2:
            changed[key] = value[:2]
        elif isinstance(value, dict) and value and key != "id2label" and all(str(k).isdigit() for k in value):
            # per layer index (Gemma 4's per_layer_config)
            if any(int(k) >= 2 for k in value):
                changed[key] = {k: v for k, v in value.items() if int(k) < 2}
        elif isinstance(value, dict) and key not in MULTIMODAL_KEYS:
            inner = _shrunk(value, layers, heads)
            if inner:
                changed[key] = _sub_config({**value, **inner})
    return changed
