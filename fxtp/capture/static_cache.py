"""Capture a HF causal LM with a static KV cache: one graph serves prefill and one-token decode, at
every batch size and cache length.

The graph's inputs are (input_ids [B, s], attention_mask [B, L], position_ids [B, s],
cache_position [s]) with B, s (1..L) and L dynamic; its output is the last position's logits
[B, vocab]. The cache is one key and one value tensor [B, kv_heads, L, head_dim] per layer, which
the graph updates in place with `aten.index_copy_` (torch.export's training IR keeps the in-place
op). They are exported as inputs, so that their B and L stay symbolic, and then made state
placeholders named "kv_cache.key_<layer>" / "kv_cache.value_<layer>": the planner shards them on
the kv-head dim like any state a sharded value is written into, and each rank graph allocates them
at the batch size and length it is made for (`sized_cache_state`). So a new batch size or cache
length needs no new export or plan. The first size a program generates at is exported at that size
instead (TPProgram.with_cache): a symbolic B and L cost export about three times as long.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch.export import Dim
from torch.export.graph_signature import OutputKind
from transformers.cache_utils import Cache, StaticLayer

from fxtp.capture.export import (Captured, CaptureError, export_model, flatten_model, max_positions, model_device,
                                model_name)
from fxtp.node_meta import STATE, TOKENS
from fxtp.capture.signatures import CAUSAL_LM, signature_of

CACHE_PREFIX = "kv_cache."  # the wrapper's submodule holding the cache buffers
CACHE_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")
EXAMPLE_BATCH, EXAMPLE_LENGTH = 2, 16  # the capture's example cache: any size serves, as both stay symbolic
MAX_BATCH = 1 << 16


def is_cache_state(name: str) -> bool:
    return name.startswith(CACHE_PREFIX)


CACHE_SIZED_DIMS = (0, 2)  # a key or value cache's [batch, heads, length, head dim]: the dims capture_cached leaves free


def sized_dims(name: str) -> tuple[int, ...]:
    """The dims of state `name` whose sizes differ from one program of the cached step to another
    (TPProgram.with_cache): a KV cache's batch and length; none of other state."""
    return CACHE_SIZED_DIMS if is_cache_state(name) else ()


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


def bind_cache(cache: Cache, keys: list, values: list, cache_position: torch.Tensor) -> None:
    """Point the static layers of `cache` at the tensors `keys` and `values` (one per layer),
    writing from cache_position[0] on, as long as they are."""
    for layer, key, value in zip(cache.layers, keys, values):
        # bound at every call: under export these attributes are the traced tensors
        layer.keys, layer.values = key, value
        layer.max_cache_len = key.shape[2]  # symbolic under export: the graph serves every length
        layer.device, layer.is_initialized = key.device, True
        # the layer derives write positions from this counter and adds to it in place
        layer.cumulative_length = cache_position[0].clone()


def buffered_cache(buffers: torch.nn.Module, layers: int) -> tuple[list, list]:
    """The key and value buffers of a module made by `cache_buffers`, in layer order."""
    return ([getattr(buffers, f"key_{i}") for i in range(layers)],
            [getattr(buffers, f"value_{i}") for i in range(layers)])


def cache_argument(model: torch.nn.Module) -> str:
    """The forward keyword taking the cache: "cache" (transformers >= 5.2x) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _CachedLogits(torch.nn.Module):
    """The model with a static cache whose tensors are the forward's `keys` and `values` (one per layer)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = Cache(layers=[StaticLayer(EXAMPLE_LENGTH) for _ in range(layers)])
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = cache_argument(model)
        self.takes_position_ids = "position_ids" in parameters

    def forward(self, input_ids, attention_mask, position_ids, cache_position, keys, values):
        bind_cache(self.cache, keys, values, cache_position)
        kwargs = {"position_ids": position_ids} if self.takes_position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                         **{self.cache_argument: self.cache}, **kwargs)
        return out.logits[:, -1]


def supports_static_cache(model_class: type) -> bool:
    """transformers' own flag: a class whose forward cannot be compiled whole has its static cache
    and compiled generate turned off (GPT-Neo, MPT; XGLM in transformers 5.17)."""
    return getattr(model_class, "_can_compile_fullgraph", True) is not False


def capture_cached(model: torch.nn.Module, size: Optional[tuple[int, int]] = None) -> Captured:
    """Export `model` with a static cache of symbolic batch size and length, or of `size` (batch,
    length): symbolic sizes make export reason about every stride of every cache and activation
    (about three times as long on Llama-3-8B's 32 layers), which the first cache of a process need
    not wait for."""
    if signature_of(model).kind != CAUSAL_LM:
        raise TypeError(f"{type(model).__name__} is not a causal LM: fxtp generates with decoder-only models")
    recurrent = recurrent_layer_kinds(model.config)
    if recurrent:
        raise CaptureError(f"fxtp generates with a static KV cache of attention layers, and {model_name(model)} has "
                           f"layers that keep a recurrent state instead ({', '.join(recurrent)}): fxtp cannot "
                           "generate with it yet. Its sharded forward works (run the program on whole sequences), "
                           "and so does the unsharded model's generate.")
    if not supports_static_cache(type(model)):
        raise CaptureError(f"{model_name(model)} does not support transformers' StaticCache (its class sets "
                           "_can_compile_fullgraph = False), which fxtp's generation captures. Its sharded forward "
                           "works (run the program on whole sequences), and so does the unsharded model's generate.")
    device = model_device(model)
    wrapper = _CachedLogits(model)
    (batch, length), seq = size or (EXAMPLE_BATCH, EXAMPLE_LENGTH), 2
    ids = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    cache_position = torch.arange(seq, device=device)
    caches = cache_buffers([cache_shape(model.config, batch, length)] * len(wrapper.cache.layers), model, device)
    keys, values = buffered_cache(caches, len(wrapper.cache.layers))
    longest = max(max_positions(model), 1 << 16)
    # the length is no named Dim: torch 2.11 cannot prove guards on the cache's symbolic strides
    # (Min(16*L, 32*L) == 16*L) and refuses one. A Dim.DYNAMIC accepts what a named Dim would have
    # refused (GPT-Neo's cache longer than its causal-mask buffer), so models that transformers says
    # its static cache does not serve were refused above
    rows, columns = (Dim.STATIC, Dim.STATIC) if size else (Dim("batch", min=1, max=MAX_BATCH), Dim.DYNAMIC(min=2, max=longest))
    tokens = Dim.DYNAMIC(min=1, max=longest)
    cache_dims = [dict(zip(CACHE_SIZED_DIMS, (rows, columns)))] * len(keys)
    hint = "Generation needs a model that supports transformers' StaticCache."
    ep = export_model(model, wrapper, (ids, mask, positions, cache_position, keys, values), None,
                      ({0: rows, 1: tokens}, {0: rows, 1: columns}, {0: rows, 1: tokens}, {0: tokens}, cache_dims,
                       cache_dims), " with a static KV cache", hint)
    # export names the tuple inputs' tensors keys_<i> and values_<i>
    inputs = CACHE_INPUTS + tuple(f"{kind}s_{i}" for kind in ("key", "value") for i in range(len(keys)))
    cache = {f"{CACHE_PREFIX}{kind}_{i}": tensor for kind, tensors in (("key", keys), ("value", values))
             for i, tensor in enumerate(tensors)}
    return with_cache_state(ep, model, inputs, cache)


def with_cache_state(ep, model: torch.nn.Module, inputs: tuple, cache: Optional[dict] = None) -> Captured:
    """The exported cache program flattened (capture.flatten_model), its cache state on meta: each
    rank allocates its own part. `cache` maps state names to the example tensors of the last inputs
    (cache tensors exported as inputs), which become state placeholders of those names."""
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in ep.graph_signature.output_specs):
        raise CaptureError("the exported cache graph returns mutated buffers instead of updating them in place; "
                           "fxtp needs torch.export's training IR (torch >= 2.11)")
    captured = flatten_model(ep, model, inputs)
    graph = captured.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_input = next(n for n in placeholders if STATE not in n.meta)
    for node, (name, example) in zip(placeholders[len(placeholders) - len(cache or {}):], (cache or {}).items()):
        node.meta[STATE] = name
        del node.meta[TOKENS]
        captured.state[name] = example
        first_input.prepend(node)  # state placeholders come first
    for name in [n for n in captured.state if is_cache_state(n)]:
        captured.state[name] = captured.state[name].to("meta")
    captured.graph_module.recompile()
    return captured


def sized_cache_state(state: dict, batch_size: int, max_length: int) -> dict:
    """`state` with the cache entries of capture_cached's symbolic capture at `batch_size` x
    `max_length` tokens (on meta: only their shapes are read, and each rank allocates its part)."""
    return {name: torch.empty((batch_size, value.shape[1], max_length, *value.shape[3:]), dtype=value.dtype,
                              device="meta") if is_cache_state(name) else value for name, value in state.items()}
