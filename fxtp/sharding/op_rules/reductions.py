"""Reductions over dims (sum, mean, amax, logsumexp, max/min) and normalizations (layer_norm, rms_norm).

A sum (or mean) over the sharded dim gives a Partial; other reductions and norms need that dim whole.
"""
from __future__ import annotations

from math import prod

import torch
import torch.fx as fx

from fxtp.sharding.layouts import Partial, Replicate, Shard
from fxtp.sharding.op_rules.helpers import P, R, ndim, norm_dim, out_count, tensor_inputs, val
from fxtp.sharding.op_rules.rule import Decision, LayoutOf


def reduction(kind: str):
    """sum/mean/amax/logsumexp over `dims` (max/min over a dim: values and indices alike): sum over the
    sharded dim gives a Partial; others need it whole."""

    def rule(node: fx.Node, lay: LayoutOf) -> Decision:
        decision = _reduce(node, lay, kind)
        if out_count(node) > 1:
            decision.out = tuple(decision.out for _ in range(out_count(node)))
        return decision

    return rule


def _reduce(node: fx.Node, lay: LayoutOf, kind: str) -> Decision:
    src = node.args[0]
    layout = lay(src)
    nd = ndim(src)
    dims = node.args[1] if len(node.args) > 1 else None
    dims = list(range(nd)) if dims is None or dims == [] else [norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if isinstance(layout, Partial):
        return Decision(P) if kind == "sum" else Decision(R, {src: R}, f"{kind} of a Partial")
    if not isinstance(layout, Shard):
        return Decision(R)
    if layout.dim in dims:
        if kind in ("sum", "mean") and all(isinstance(val(src).shape[d], int) for d in dims):
            return Decision(P)  # a mean is lowered to local sum / global count (mean_as_partial)
        return Decision(R, {src: R}, f"{kind} over the sharded dim")
    shift = 0 if keepdim else sum(1 for d in dims if d < layout.dim)
    return Decision(layout.with_dim(layout.dim - shift))


def partial_mean(x: torch.Tensor, dims: list, keepdim: bool, count: int) -> torch.Tensor:
    """This rank's summand of a mean over a sharded dim (OLMo-2's q/k norms span all heads)."""
    return torch.sum(x, dims, keepdim) / count


def mean_as_partial(node, args, kwargs, layout_of, rank, group_name):
    """mean.dim over the sharded dim: every rank divides its local sum by the global count."""
    layout = layout_of(node.args[0])
    dims = [norm_dim(d, ndim(node.args[0])) for d in node.args[1]]
    if not isinstance(layout, Shard) or layout.dim not in dims:
        return node.target, args, kwargs
    count = prod(int(val(node.args[0]).shape[d]) for d in dims)
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return partial_mean, (args[0], args[1], keepdim, count), {}


def norm(node: fx.Node, lay: LayoutOf) -> Decision:
    """layer_norm / rms_norm(x, normalized_shape, weight, ...): normalized dims must be whole."""
    src = node.args[0]
    layout = lay(src)
    nd = ndim(src)
    normalized = len(node.args[1])
    wants = {n: R for n in tensor_inputs(node)[1:] if not isinstance(lay(n), Replicate)}
    if isinstance(layout, Partial) or (isinstance(layout, Shard) and layout.dim >= nd - normalized):
        return Decision(R, {src: R, **wants}, "normalization over the sharded dim")
    return Decision(layout, wants)
