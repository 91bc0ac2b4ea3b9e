"""Dropout in graphs captured for training: the same mask on every rank where the value is replicated,
independent masks on the parts of a sharded one.

Ranks seeded alike draw alike. Where the value is replicated (or Partial: dropout is linear for a
fixed mask) every rank draws the mask of the same shape, so their masks agree. Where it is sharded,
each rank draws the mask of the whole value and keeps its own part (`sharded_dropout`): the parts are
those of one mask, as independent as the unsharded model's, and every rank's generator stays in
step for the dropouts after. It is the unsharded model's own mask, so a sharded training step
equals the unsharded one under the same seed. The price is drawing the full mask on each rank.
Attention's own dropout (scaled_dot_product_attention's dropout_p) over sharded heads is computed
by `attention_with_sharded_dropout`, which draws its mask the same way.
"""
from __future__ import annotations

import math

import torch

from fxtp.sharding.collectives import local_part, shard_args
from fxtp.sharding.layouts import Shard

aten = torch.ops.aten


def sharded_dropout(x: torch.Tensor, p: float, train: bool, dim: int, counts: tuple, inner: int, outer: int,
                    rank: int) -> torch.Tensor:
    """dropout of the whole value, Shard(dim, counts, inner, outer), whose part on `rank` is `x`."""
    if not train or p == 0:
        return aten.dropout.default(x, p, train)
    whole = list(x.shape)
    whole[dim] = sum(counts) * inner * outer if inner > 0 and outer > 0 else x.shape[dim] // counts[rank] * sum(counts)
    # dropout of ones is the scaled mask, drawn exactly as dropout draws it for a value of that shape
    scaled_mask = aten.dropout.default(x.new_ones(whole), p, True)
    return x * local_part(scaled_mask, dim, counts, inner, outer, rank)


def attention_with_sharded_dropout(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                   scale=None, enable_gqa=False, shard=(1, (1,), 1, 1), rank=0) -> torch.Tensor:
    """scaled_dot_product_attention of sharded heads (or batch) with dropout: the math attention, with the
    attention weights' mask drawn for the whole [batch, heads, L, S] as the unsharded model's math
    attention draws it (sharded_dropout). `shard`: (dim, counts, inner, outer) of the output."""
    if enable_gqa:
        repeats = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    weights = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        weights = weights.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        weights = weights.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else weights + attn_mask
    weights = aten._safe_softmax.default(weights, -1)  # a row with every key masked attends to nothing, as SDPA's
    return sharded_dropout(weights, dropout_p, True, *shard, rank) @ value


def lower_attention(node, args, kwargs, input_layout, rank, group_name):
    """A rank's attention with dropout over sharded heads or batch: attention_with_sharded_dropout."""
    layout = input_layout(node.args[0])
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    given = {**dict(zip(names, args)), **kwargs}
    if not isinstance(layout, Shard) or not given.get("dropout_p", 0.0):
        return node.target, args, kwargs
    return attention_with_sharded_dropout, (), {**given, "shard": shard_args(layout), "rank": rank}


def lower_dropout(node, args, kwargs, input_layout, rank, group_name):
    """A rank's dropout of a shard: sharded_dropout; of a replicated or Partial value: dropout itself."""
    layout = input_layout(node.args[0])
    if not isinstance(layout, Shard):
        return node.target, args, kwargs
    x, p, train = args
    return sharded_dropout, (x, p, train, *shard_args(layout), rank), kwargs


# the ops of rank graphs that may draw random numbers
_RANDOM_OPS = frozenset({aten.dropout.default, aten.native_dropout.default, aten.bernoulli.default,
                         aten.bernoulli.p, aten.rand.default, aten.randn.default, sharded_dropout,
                         attention_with_sharded_dropout, aten.scaled_dot_product_attention.default})


def draws_random(node) -> bool:
    """Whether a rank graph's node draws random numbers (attention only with a dropout probability):
    fxtp/runtime/simulate.py draws them alike on every rank, and a rank module checks that its ranks'
    generators agree before a call."""
    if node.op != "call_function" or node.target not in _RANDOM_OPS:
        return False
    if node.target is not aten.scaled_dot_product_attention.default:
        return True
    return bool(node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0))
