"""Capture a HF causal LM with a static KV cache: one graph serves prefill and one-token decode.

The graph's inputs are (input_ids [B, s], attention_mask [B, L], position_ids [B, s],
cache_position [s]) with s dynamic (1..L) and B, L fixed; its output is the last position's
logits [B, vocab]. The cache is one key and one value buffer [B, kv_heads, L, head_dim] per layer,
state placeholders named "kv_cache.key_<layer>" / "kv_cache.value_<layer>", which the graph
updates in place with `aten.index_copy_` (torch.export's training IR keeps the in-place op), so
the planner shards them on the kv-head dim like any state a sharded value is written into.
"""
from __future__ import annotations

import inspect

import torch
from torch.export import Dim
from torch.export.graph_signature import OutputKind
from transformers.cache_utils import Cache, StaticLayer

from fxtp.capture.export import Captured, CaptureError, export_model, flatten_model, model_device, model_name
from fxtp.capture.signatures import CAUSAL_LM, signature_of

CACHE_PREFIX = "kv_cache."  # the wrapper's submodule holding the cache buffers
CACHE_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")


def is_cache_state(name: str) -> bool:
    return name.startswith(CACHE_PREFIX)


# layer kinds (config.layer_types, Jamba's layers_block_type) that keep a recurrent state between
# steps (Mamba's SSM and conv state, gated delta nets, short convolutions): not keys and values
RECURRENT_LAYERS = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba"})


def recurrent_layer_kinds(config) -> list[str]:
    """The kinds of `config`'s layers whose state a KV cache cannot hold (all its layers where the
    config has no attention heads: Mamba's at transformers 5.17), or []."""
    text = config.get_text_config(decoder=True)
    kinds = {*(getattr(text, "layer_types", None) or ()), *(getattr(text, "layers_block_type", None) or ())}
    found = sorted(k for k in kinds if k in RECURRENT_LAYERS)
    return found or ([] if hasattr(text, "num_attention_heads") else [text.model_type])


def cache_shape(config, batch_size: int, max_length: int) -> tuple[int, int, int, int]:
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return batch_size, kv_heads, max_length, head_dim


def cache_buffers(shapes: list, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A module whose buffers "key_<i>", "value_<i>" (shape shapes[i], the model's dtype) hold the cache."""
    buffers = torch.nn.Module()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for i, shape in enumerate(shapes):
        # untouched zero pages: export only reads their shape, and each rank allocates its own part
        buffers.register_buffer(f"key_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        buffers.register_buffer(f"value_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
    return buffers


def bind_cache(cache: Cache, buffers: torch.nn.Module, cache_position: torch.Tensor) -> None:
    """Point the static layers of `cache` at `buffers`, writing from cache_position[0] on."""
    for i, layer in enumerate(cache.layers):
        # bound at every call: under export these attributes are the traced buffers
        layer.keys, layer.values = getattr(buffers, f"key_{i}"), getattr(buffers, f"value_{i}")
        layer.device, layer.is_initialized = layer.keys.device, True
        # the layer derives write positions from this counter and adds to it in place
        layer.cumulative_length = cache_position[0].clone()


def cache_argument(model: torch.nn.Module) -> str:
    """The forward keyword taking the cache: "cache" (transformers >= 5.2x) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _CachedLogits(torch.nn.Module):
    """The model with a static cache whose tensors are this module's buffers, so that export
    lifts them as state and records their in-place updates."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int, device: torch.device):
        super().__init__()
        self.model = model
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = Cache(layers=[StaticLayer(max_length) for _ in range(layers)])
        self.kv_cache = cache_buffers([cache_shape(model.config, batch_size, max_length)] * layers, model, device)
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = cache_argument(model)
        self.takes_position_ids = "position_ids" in parameters

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        bind_cache(self.cache, self.kv_cache, cache_position)
        kwargs = {"position_ids": position_ids} if self.takes_position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                         **{self.cache_argument: self.cache}, **kwargs)
        return out.logits[:, -1]


def capture_cached(model: torch.nn.Module, batch_size: int, max_length: int) -> Captured:
    """Export `model` with a static cache of `batch_size` x `max_length` tokens."""
    if signature_of(model).kind != CAUSAL_LM:
        raise TypeError(f"{type(model).__name__} is not a causal LM: fxtp generates with decoder-only models")
    recurrent = recurrent_layer_kinds(model.config)
    if recurrent:
        raise CaptureError(f"fxtp generates with a static KV cache of attention layers, and {model_name(model)} has "
                           f"layers that keep a recurrent state instead ({', '.join(recurrent)}): fxtp cannot "
                           "generate with it yet. Its sharded forward works (run the program on whole sequences), "
                           "and so does the unsharded model's generate.")
    device = model_device(model)
    wrapper = _CachedLogits(model, batch_size, max_length, device)
    seq = min(2, max_length)
    ids = torch.ones(batch_size, seq, dtype=torch.long, device=device)
    mask = torch.ones(batch_size, max_length, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=device).expand(batch_size, seq)
    cache_position = torch.arange(seq, device=device)
    tokens = Dim.DYNAMIC(min=1, max=max_length)
    ep = export_model(model, wrapper, (ids, mask, positions, cache_position), None,
                      ({1: tokens}, None, {1: tokens}, {0: tokens}), " with a static KV cache",
                      "Generation needs a model that supports transformers' StaticCache.")
    return with_cache_state(ep, model, CACHE_INPUTS)


def with_cache_state(ep, model: torch.nn.Module, inputs: tuple) -> Captured:
    """The exported cache program flattened (capture.flatten_model), its cache state on meta: each
    rank allocates its own part."""
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in ep.graph_signature.output_specs):
        raise CaptureError("the exported cache graph returns mutated buffers instead of updating them in place; "
                           "fxtp needs torch.export's training IR (torch >= 2.11)")
    captured = flatten_model(ep, model, inputs)
    for name in [n for n in captured.state if is_cache_state(n)]:
        captured.state[name] = captured.state[name].to("meta")
    return captured
