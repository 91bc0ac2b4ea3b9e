"""Ops that repeat a tensor's values along a dim: repeat_interleave (each element r times in a row:
GQA's kv heads repeated into their query heads, MoE's rows repeated per routed expert) and repeat
(the whole dim tiled r times: JetMoE's kv heads, Llama 4's rows per expert).

Both keep a shard of the repeated dim, as a Shard of another structure: the repeats of a unit stay
on the rank that owns it. Both are linear, so a Partial passes.
"""
from __future__ import annotations

import torch.fx as fx

from fxtp.sharding.layouts import Shard
from fxtp.sharding.op_rules.helpers import R, arg, ndim, norm_dim
from fxtp.sharding.op_rules.rule import Decision, LayoutOf


def repeat_interleave(node: fx.Node, lay: LayoutOf) -> Decision:
    """repeat_interleave(x, r, dim): along a sharded dim, unit u of `inner` elements becomes the
    `inner * r` elements u*inner*r ... (u+1)*inner*r - 1, still contiguous on its rank:
    Shard(dim, counts, inner * r, outer). Without a dim it flattens x first: a shard is gathered."""
    src, repeats, dim = node.args[0], node.args[1], arg(node, 2, "dim")
    layout = lay(src)
    if not isinstance(layout, Shard) or dim is not None and norm_dim(dim, ndim(src)) != layout.dim:
        return Decision(layout)
    if dim is None or not isinstance(repeats, int):
        return Decision(R, {src: R}, f"{node.target} of a sharded tensor {'flattened' if dim is None else 'by a symbolic count'}")
    return Decision(Shard(layout.dim, layout.counts, layout.inner * repeats, layout.outer))


def localize_output_size(node, args, kwargs, out, rank):
    """repeat_interleave's output_size, when given, is the rank's size of the repeated dim where that is sharded."""
    dim = arg(node, 2, "dim")
    if not isinstance(out, Shard) or arg(node, 3, "output_size") is None or norm_dim(dim, ndim(node)) != out.dim:
        return args, kwargs
    if len(args) > 3:
        return (*args[:3], out.local_size(rank), *args[4:]), kwargs
    return args, {**kwargs, "output_size": out.local_size(rank)}


def repeat(node: fx.Node, lay: LayoutOf) -> Decision:
    """x.repeat(r_0, ..., r_k) (leading repeats add dims): along a sharded dim the whole dim is tiled
    r times, so each tile is one more outer block: Shard(dim, counts, inner, outer * r)."""
    src, repeats = node.args[0], list(node.args[1])
    layout = lay(src)
    if not isinstance(layout, Shard):
        return Decision(layout)
    dim = layout.dim + len(repeats) - ndim(src)
    times = repeats[dim]
    if not isinstance(times, int):
        return Decision(R, {src: R}, f"{node.target} of a sharded dim by a symbolic count")
    return Decision(Shard(dim, layout.counts, layout.inner, layout.outer * times))
