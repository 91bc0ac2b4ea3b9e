"""Elementwise ops with broadcasting, and casts.

A shard passes through (replicated inputs that are not broadcast along it are sliced to match);
a Partial passes only where the op is linear in it (see `pointwise`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxtp.sharding.layouts import Partial, Replicate, Shard, same_placement
from fxtp.sharding.op_rules.helpers import P, R, ndim, shard_of, tensor_inputs, val
from fxtp.sharding.op_rules.rule import Decision, LayoutOf

aten = torch.ops.aten


def _broadcast_target(node: fx.Node, lay: LayoutOf, inputs: list[fx.Node]) -> tuple[Optional[Shard], dict, str]:
    """The output Shard of a broadcasting op, and the slices its replicated inputs need."""
    out_nd = ndim(node)
    target: Optional[Shard] = None
    for n in inputs:
        s = shard_of(n, lay)
        if s is None:
            continue
        mapped = s.with_dim(s.dim + out_nd - ndim(n))
        if target is None:
            target = mapped
        elif not same_placement(target, mapped):
            return None, {m: R for m in inputs if not isinstance(lay(m), Replicate)}, "inputs sharded differently"
    wants = {}
    if target is not None:
        for n in inputs:
            d = target.dim - (out_nd - ndim(n))
            if isinstance(lay(n), Shard):
                continue
            if d >= 0 and val(n).shape[d] != 1:
                wants[n] = target.with_dim(d)
    return target, wants, ""


def pointwise(linear: str = "none"):
    """Elementwise ops with broadcasting. `linear` says which Partial inputs pass through:
    'unary' (neg: f(sum) = sum f), 'sum' (add/sub: every tensor input Partial, no scalar
    added), 'scale' (mul/div: one Partial input times Replicate values), 'zero_fill'
    (masked_fill(P, mask, 0): every summand is zeroed where the sum is)."""

    def rule(node: fx.Node, lay: LayoutOf) -> Decision:
        inputs = tensor_inputs(node)
        target, wants, note = _broadcast_target(node, lay, inputs)
        if note:
            return Decision(R, wants, note)
        partials = [n for n in inputs if isinstance(lay(n), Partial)]
        if target is not None:
            for n in partials:  # sliced above if it has the sharded dim; broadcast along it, it needs the sum
                wants.setdefault(n, R)
            return Decision(target, wants)
        if not partials:
            return Decision(R)
        if partials_pass(node, inputs, partials, linear):
            return Decision(P)
        return Decision(R, {n: R for n in partials}, f"{node.target} of a Partial and replicated values needs the sum")

    return rule


def partials_pass(node, inputs, partials, linear) -> bool:
    if linear == "unary":
        return True
    if linear == "sum":
        scalars = [a for a in node.args if not isinstance(a, fx.Node)]
        alpha = node.kwargs.get("alpha", 1)
        return len(partials) == len(inputs) and not scalars and isinstance(alpha, (int, float))
    if linear == "scale":
        # mul(P, R) or div(P, R): exactly one summand-carrying input, in the numerator for div
        if len(partials) != 1:
            return False
        return node.target not in (aten.div.Tensor, aten.div_.Tensor) or node.args[0] is partials[0]
    if linear == "zero_fill":
        return partials == [node.args[0]] and node.args[2] == 0
    return False


def cast(node: fx.Node, lay: LayoutOf) -> Decision:
    """to/type_as/_to_copy: layout of the first input; a Partial only if the dtype is kept."""
    src = node.args[0]
    layout = lay(src)
    if isinstance(layout, Partial) and val(src).dtype != val(node).dtype:
        return Decision(R, {src: R}, "cast of a Partial changes rounding")
    others = {n: R for n in tensor_inputs(node)[1:] if not isinstance(lay(n), Replicate)}
    return Decision(layout, others)
