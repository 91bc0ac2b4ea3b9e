"""Fuse a push all_reduce with the residual add and RMSNorm after it (a decode step's twin with
push all_reduce, `DecodeOptions.push_norm`, fxtp/decode/options.py).

Reads:  `fxtp::push_all_reduce` nodes (fxtp/kernels/push_all_reduce.py) whose only user is an add, and
        the nodes after that add, matched one by one:

    s = push_all_reduce(x, group)
    h = add(residual, s)                 # either order; h may have other users (the next residual add)
    u = to(h, float32)                   # the casts: both or neither (float32 graphs lose them)
    r = rsqrt(add(mean(pow(u, 2), [-1], keepdim=True), eps))   # u: pow and the mul its only users
    n = to(mul(u, r), dtype)             # either order
    y = mul(weight, n)                   # either order; weight a get_attr or placeholder

        every node from pow to n read by the next one alone.
Writes: `hidden, normed = push_all_reduce_add_rms_norm(x, residual, weight, eps, dtype or None,
        group)` before the add; `hidden` (meta of h) replaces h everywhere, `normed` (meta of y)
        replaces y, and the chain is gone. The rank graphs hold no dtypes, so the op takes the
        graph's rounding dtype and proves at run time what its kernel computes (`fits_norm_epilogue`).
Leaves alone LayerNorms (layer_norm, or a mean subtracted), Gemma's `mul(n, add(weight, 1))`,
the embedding's all_reduce (read by the first norm with no add), and anything else that differs.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

import fxtp.kernels.push_all_reduce  # noqa: F401 - registers the fxtp ops
from fxtp.passes.node_match import only_user
from fxtp.node_meta import LAYOUT

aten = torch.ops.aten
PUSH = torch.ops.fxtp.push_all_reduce.default
FUSED = torch.ops.fxtp.push_all_reduce_add_rms_norm.default


def fuse_add_rms_norm(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    for push in list(graph.nodes):
        if push.target is not PUSH or len(push.users) != 1:
            continue
        (add,) = push.users
        norm = _add_rms_norm(add, push)
        if norm is None:
            continue
        residual, weight, eps, dtype, y = norm
        if weight.op == "get_attr" and add < weight:
            add.prepend(weight)
        with graph.inserting_before(add):
            fused = graph.call_function(FUSED, (push.args[0], residual, weight, eps, dtype, push.args[1]))
            hidden = graph.call_function(operator.getitem, (fused, 0))
            normed = graph.call_function(operator.getitem, (fused, 1))
        fused.meta = {**add.meta, LAYOUT: (add.meta.get(LAYOUT), y.meta.get(LAYOUT))}
        hidden.meta, normed.meta = dict(add.meta), dict(y.meta)
        y.replace_all_uses_with(normed)
        add.replace_all_uses_with(hidden)  # the chain's reads among them: it is dead now
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _add_rms_norm(add: fx.Node, push: fx.Node) -> Optional[tuple]:
    """(residual, weight, eps, rounding dtype or None, y) where `add` and its users match the
    pattern above; None where anything differs."""
    if add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2 or add.args.count(push) != 1:
        return None
    residual = add.args[1] if add.args[0] is push else add.args[0]
    if not isinstance(residual, fx.Node):
        return None
    upcasts = [u for u in add.users if _cast_dtype(u) == torch.float32]
    for upcast in upcasts or [add]:
        scaling = _rms_scaled(upcast)
        if scaling is None:
            continue
        power, normalized, eps = scaling
        dtype = None
        if upcast is not add:
            cast = only_user(normalized)
            dtype = None if cast is None else _cast_dtype(cast)
            if dtype is None or set(upcast.users) != {power, normalized}:
                continue
            normalized = cast
        y = only_user(normalized)
        if y is None or y.target is not aten.mul.Tensor or y.kwargs or len(y.args) != 2 or normalized not in y.args:
            continue
        weight = y.args[1] if y.args[0] is normalized else y.args[0]
        if isinstance(weight, fx.Node) and weight.op in ("get_attr", "placeholder"):
            return residual, weight, eps, dtype, y
    return None


def _rms_scaled(u: fx.Node) -> Optional[tuple]:
    """(pow, mul, eps) where `mul(u, rsqrt(add(mean(pow(u, 2), [-1], True), eps)))` reads `u`, each
    node but the mul read by the next one alone; else None."""
    for power in u.users:
        if power.target is not aten.pow.Tensor_Scalar or power.args != (u, 2) or power.kwargs:
            continue
        mean = only_user(power)
        if mean is None or mean.target is not aten.mean.dim or mean.args != (power, [-1], True) or mean.kwargs:
            continue
        plus_eps = only_user(mean)
        if (plus_eps is None or plus_eps.target is not aten.add.Tensor or plus_eps.kwargs or len(plus_eps.args) != 2
                or plus_eps.args[0] is not mean or type(plus_eps.args[1]) is not float):
            continue
        rsqrt = only_user(plus_eps)
        if rsqrt is None or rsqrt.target is not aten.rsqrt.default:
            continue
        scaled = only_user(rsqrt)
        if (scaled is not None and scaled.target is aten.mul.Tensor and not scaled.kwargs
                and len(scaled.args) == 2 and set(scaled.args) == {u, rsqrt}):
            return power, scaled, plus_eps.args[1]
    return None


def _cast_dtype(node: fx.Node) -> Optional[torch.dtype]:
    """The dtype `node` casts its input to, where it is a plain cast (`to.dtype` or `_to_copy`)."""
    if node.target is aten.to.dtype and len(node.args) == 2 and not node.kwargs:
        return node.args[1]
    if node.target is aten._to_copy.default and len(node.args) == 1 and node.kwargs.keys() == {"dtype"}:
        return node.kwargs["dtype"]
    return None
