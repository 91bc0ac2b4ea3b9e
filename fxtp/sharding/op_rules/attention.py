"""scaled_dot_product_attention: heads (or batch) stay sharded through attention."""
from __future__ import annotations

import torch.fx as fx

from fxtp.sharding.layouts import Partial, Replicate, Shard, same_placement
from fxtp.sharding.op_rules.helpers import R, arg, ndim, replicate_all, shard_of, val
from fxtp.sharding.op_rules.rule import Decision, LayoutOf


def sdpa(node: fx.Node, lay: LayoutOf) -> Decision:
    """scaled_dot_product_attention(q, k, v, mask): heads (dim 1) or batch (dim 0) may be
    sharded; k, v and a per-head mask are sliced to match q. With enable_gqa, k/v hold
    q_heads/rep heads and must be sharded rep times coarser."""
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    inputs = [n for n in (q, k, v, mask) if isinstance(n, fx.Node)]
    if any(isinstance(lay(n), Partial) for n in inputs):
        return replicate_all(node, lay, "attention of a Partial")
    sq = shard_of(q, lay)
    if sq is None:
        if all(isinstance(lay(n), Replicate) for n in inputs):
            return Decision(R)
        return replicate_all(node, lay, "attention with q replicated but k/v sharded")
    if sq.dim not in (0, 1):
        return replicate_all(node, lay, "attention sharded along sequence or head_dim")
    wants = {}
    for n in (k, v):
        need = sq
        size = val(n).shape[sq.dim]
        if size == 1 and sq.dim == 1 and isinstance(lay(n), Replicate):
            continue  # one kv head broadcast over q's heads (multi-query attention): every rank reads it
        if size != val(q).shape[sq.dim]:
            rep = val(q).shape[sq.dim] // size
            if any(c % rep for c in sq.counts) or sq.outer != 1:
                return replicate_all(node, lay, "GQA heads do not split evenly with q")
            need = Shard(sq.dim, tuple(c // rep for c in sq.counts), sq.inner)
        s = shard_of(n, lay)
        if s is None:
            wants[n] = need
        elif not same_placement(s, need):
            return replicate_all(node, lay, "q and k/v sharded differently")
    if isinstance(mask, fx.Node):
        d = sq.dim - (ndim(q) - ndim(mask))
        s = shard_of(mask, lay)
        if d >= 0 and val(mask).shape[d] != 1:
            if s is None:
                wants[mask] = sq.with_dim(d)
            elif not same_placement(s, sq.with_dim(d)):
                return replicate_all(node, lay, "mask sharded differently from q")
        elif s is not None:
            wants[mask] = R
    return Decision(sq, wants)
