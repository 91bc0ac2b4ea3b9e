"""Attention over grouped key/value heads without repeating them (HF's repeat_kv).

Reads:  rank-graph nodes `a = scaled_dot_product_attention(q, k', v', mask)` (not causal, no
        dropout, no enable_gqa) whose k' and v' are `reshape(expand(k5, [b, hkv, n, l, d]),
        [b, hkv * n, l, d])`: each kv head repeated for the n query heads of its group.
Writes: `a = grouped_query_attention(q, k5, v5, mask, scale=...)`; the expands and reshapes are
        removed when nothing else reads them.

    before                                        after
    k' = reshape(expand(k5, [b,1,4,l,d]), [b,4,l,d])
    v' = reshape(expand(v5, [b,1,4,l,d]), [b,4,l,d])
    a = sdpa(q, k', v', mask)   q: [b,4,s,d]      a = grouped_query_attention(q, k5, v5, mask)

The n query heads of a group become n times as many query rows of one head: the same scores
and softmax rows, but attention reads the KV cache in place instead of copies of it n times as
large (two copy kernels a layer in a compiled decode step). The match is structural, so every
rank's graph changes the same way (fxtp/runtime/simulate.py runs them in lockstep).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxtp.rank_ops.grouped_query import grouped_query_attention

aten = torch.ops.aten


def fold_grouped_query(gm: fx.GraphModule) -> fx.GraphModule:
    for attention in list(gm.graph.nodes):
        if attention.target is not aten.scaled_dot_product_attention.default:
            continue
        args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), attention.args))
        args.update(attention.kwargs)
        sources = [_repeated_source(args[name]) for name in ("key", "value")]
        if None in sources or args.get("dropout_p", 0.0) != 0.0 or args.get("is_causal", False) \
                or args.get("enable_gqa", False):
            continue
        repeated = [args[name] for name in ("key", "value")]
        with gm.graph.inserting_before(attention):
            folded = gm.graph.call_function(grouped_query_attention, (args["query"], *sources, args.get("attn_mask")),
                                            {"scale": args.get("scale")})
        folded.meta.update(attention.meta)
        attention.replace_all_uses_with(folded)
        gm.graph.erase_node(attention)
        for reshape in repeated:
            if not reshape.users:
                expand = reshape.args[0]
                gm.graph.erase_node(reshape)
                if not expand.users:
                    gm.graph.erase_node(expand)
    gm.graph.lint()
    gm.recompile()
    return gm


def _repeated_source(node) -> Optional[fx.Node]:
    """k5 of `reshape(expand(k5, [b, hkv, n, l, d]), [b, hkv * n, l, d])`, else None."""
    if not (isinstance(node, fx.Node) and node.target in (aten.reshape.default, aten.view.default)):
        return None
    expand, merged = node.args
    if not (isinstance(expand, fx.Node) and expand.target is aten.expand.default):
        return None
    repeated = expand.args[1]
    if len(repeated) != 5 or len(merged) != 4 or merged[0] != repeated[0] or list(merged[2:]) != list(repeated[3:]):
        return None  # not the merge of dims 1 and 2 (kv heads and their repeats)
    return expand.args[0]
