"""Contractions: projections (linear, MoE's grouped mm), matmul/mm/bmm and baddbmm.

A projection is column-parallel (replicated x, W sharded on its output features: a sharded
output), row-parallel (x sharded on its input features, W sliced alike: a Partial), or linear in
a Partial x. matmul contracts two activations and follows shards of either operand's dims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from fxtp.sharding.layouts import Partial, Replicate, Shard, same_placement
from fxtp.sharding.op_rules.helpers import P, R, arg, ndim, replicate_all, shard_of, val
from fxtp.sharding.op_rules.rule import Decision, LayoutOf

aten = torch.ops.aten

# Per-expert GEMMs of MoE layers. transformers registers its fallback op only when imported, so
# it is named here (fxtp does not import transformers); see table.rule_for and helpers.calls.
GROUPED_MM_FALLBACK = "transformers::grouped_mm_fallback"
GROUPED_MM = (aten._grouped_mm.default, GROUPED_MM_FALLBACK)


@dataclass(frozen=True)
class Projection:
    """Where an op computing x[..., in] @ W -> [..., out] (+ b) keeps its operands."""
    name: str                       # for the dump's notes
    weight_in: int                  # W's dim of input features (contracted)
    weight_out: int                 # W's dim of output features
    bias_out: int                   # b's dim of output features
    bias_arg: int                   # b's position in the call
    routing_arg: Optional[int] = None  # offs, the rows of each expert: x must be [S, in], its rows not sharded
    shape: str = ""                 # the operand shapes the rule handles, where it checks them


# linear(x, W[out, in], b[out])
LINEAR = Projection("linear", weight_in=1, weight_out=0, bias_out=0, bias_arg=2)
# grouped mm(x[S, in], W[E, in, out], offs, b[E, out]): the rows of expert e are offs[e-1]:offs[e]
GROUPED = Projection("grouped mm", weight_in=1, weight_out=2, bias_out=1, bias_arg=3, routing_arg=2,
                     shape="x[S, in] @ W[E, in, out]")


def projection(p: Projection):
    """The rule of a projection op; per row (per expert's rows) each is a linear, so:
    column: x R, W S(out)                        -> S(last), b sliced like W
    row:    x S(last), W R or S(in) same placement -> P (W sliced: a parameter is just stored so), no bias
    a batch-like dim of x sharded, W R          -> that shard (rows are independent; not where routed)
    Partial x and W replicated, no bias         -> P (linear in x).
    Routing (offs) is always Replicate."""

    def rule(node: fx.Node, lay: LayoutOf) -> Decision:
        x, w = node.args[0], node.args[1]
        b = arg(node, p.bias_arg, "bias")
        offs = arg(node, p.routing_arg, "offs") if p.routing_arg is not None else None
        if p.routing_arg is not None and (ndim(x) != 2 or ndim(w) != 3):
            return replicate_all(node, lay, f"{p.name} other than {p.shape}")
        xl, wl, sx = lay(x), lay(w), shard_of(x, lay)
        routing = {offs: R} if isinstance(offs, fx.Node) and not isinstance(lay(offs), Replicate) else {}
        whole = {**routing, **({b: R} if isinstance(b, fx.Node) and not isinstance(lay(b), Replicate) else {})}
        if isinstance(wl, Shard) and wl.dim == p.weight_out and isinstance(xl, Replicate):
            bias = {b: wl.with_dim(p.bias_out)} if isinstance(b, fx.Node) else {}
            return Decision(wl.with_dim(ndim(node) - 1), {**routing, **bias})
        if b is None and sx is not None and sx.dim == ndim(x) - 1:
            need = sx.with_dim(p.weight_in)
            if isinstance(wl, Replicate):
                return Decision(P, {**routing, w: need})
            if isinstance(wl, Shard) and same_placement(wl, need):
                return Decision(P, routing)
        if p.routing_arg is None and sx is not None and sx.dim < ndim(x) - 1 and isinstance(wl, Replicate):
            return Decision(sx, whole)
        if b is None and isinstance(xl, Partial) and isinstance(wl, Replicate):
            return Decision(P, routing)
        if isinstance(xl, Replicate) and isinstance(wl, Replicate):
            return Decision(R, whole)
        return replicate_all(node, lay, f"{p.name} with incompatible input and weight layouts")

    return rule




def matmul(node: fx.Node, lay: LayoutOf) -> Decision:
    """a[..., n, k] @ b[..., k, m] (matmul/mm/bmm): shards of batch dims, n, m pass through;
    the contraction dim sharded on both sides gives a Partial."""
    return _product(node, lay, node.args[0], node.args[1])


def baddbmm(node: fx.Node, lay: LayoutOf) -> Decision:
    """beta * input + alpha * (a @ b) (Bloom's ALiBi scores): the product as for bmm; a
    replicated input is sliced like a sharded product (ALiBi by head), otherwise all whole."""
    src, a, b = node.args[:3]
    product = _product(node, lay, a, b)
    target, have = product.out, lay(src)
    if not isinstance(target, Shard):
        if isinstance(target, Replicate):
            return Decision(R, {**product.wants, **({} if isinstance(have, Replicate) else {src: R})}, product.note)
        return replicate_all(node, lay, "baddbmm of a Partial product")
    d = target.dim - (ndim(node) - ndim(src))
    if isinstance(have, Replicate):
        broadcast = d < 0 or val(src).shape[d] == 1
        return Decision(target, {**product.wants, **({} if broadcast else {src: target.with_dim(d)})})
    if isinstance(have, Shard) and same_placement(have, target.with_dim(d)):
        return Decision(target, product.wants)
    return replicate_all(node, lay, "baddbmm input sharded unlike the product")


def _product(node: fx.Node, lay: LayoutOf, a: fx.Node, b: fx.Node) -> Decision:
    al, bl = lay(a), lay(b)
    na, nb, no = ndim(a), ndim(b), ndim(node)
    if na < 2 or nb < 2:
        return replicate_all(node, lay, "matmul with a vector")
    if isinstance(al, Partial) and isinstance(bl, Replicate) or isinstance(al, Replicate) and isinstance(bl, Partial):
        return Decision(P)
    if isinstance(al, Replicate) and isinstance(bl, Replicate):
        return Decision(R)
    sa, sb = shard_of(a, lay), shard_of(b, lay)
    if isinstance(al, Partial) or isinstance(bl, Partial):
        # the sum first (a row-parallel output read by a column-parallel W @ x: Mamba's dt_proj)
        partial = a if isinstance(al, Partial) else b
        summed = _product(node, lambda n: R if n is partial else lay(n), a, b)
        return Decision(summed.out, {partial: R, **summed.wants}, summed.note)
    if sa is not None and sa.dim == na - 1 or sb is not None and sb.dim == nb - 2:
        need_a = sa if sa is not None and sa.dim == na - 1 else sb.with_dim(na - 1)
        need_b = sb if sb is not None and sb.dim == nb - 2 else sa.with_dim(nb - 2)
        if same_placement(need_a, sa or need_a) and same_placement(need_b, sb or need_b) and same_placement(need_a.with_dim(0), need_b.with_dim(0)):
            wants = {}
            if sa is None:
                wants[a] = need_a
            if sb is None:
                wants[b] = need_b
            if (sa is None or sa.dim == na - 1) and (sb is None or sb.dim == nb - 2):
                return Decision(P, wants)
        return replicate_all(node, lay, "matmul contraction sharded differently")
    if sa is not None and sa.dim == na - 2 and sb is None:
        return Decision(sa.with_dim(no - 2))
    if sb is not None and sb.dim == nb - 1 and sa is None:
        return Decision(sb.with_dim(no - 1))
    # batch dims: align from the right of the batch part
    target = (sa.with_dim(sa.dim + no - na) if sa is not None else sb.with_dim(sb.dim + no - nb))
    wants = {}
    for n, s, nd in ((a, sa, na), (b, sb, nb)):
        d = target.dim - (no - nd)
        if s is not None:
            if not same_placement(s, target.with_dim(s.dim)) or s.dim != d:
                return replicate_all(node, lay, "matmul batch dims sharded differently")
        elif d >= 0 and val(n).shape[d] != 1:
            wants[n] = target.with_dim(d)
    return Decision(target, wants)


def einsum(node: fx.Node, lay: LayoutOf) -> Decision:
    """einsum(equation, operands) without '...' (Mamba-2's chunked scan): shards of one index that
    every operand holding it shares (replicated ones sliced to match) pass to the output where it
    is there, and give a Partial where it is summed over; one Partial operand among replicated
    ones stays Partial (linear in each operand)."""
    equation, operands = node.args[0], list(node.args[1])
    inputs, _, output = equation.replace(" ", "").partition("->")
    subscripts = inputs.split(",")
    layouts = [lay(n) for n in operands]
    if "." in equation or not output and "->" not in equation or len(subscripts) != len(operands):
        return replicate_all(node, lay, "einsum with '...' or an implicit output")
    partials = [n for n, x in zip(operands, layouts) if isinstance(x, Partial)]
    shards = [(s, x) for s, x in zip(subscripts, layouts) if isinstance(x, Shard)]
    if not shards:
        if len(partials) == 1:
            return Decision(P)
        return Decision(R, {n: R for n in partials}, "einsum of several Partials" if partials else "")
    index, shard = shards[0][0][shards[0][1].dim], shards[0][1]
    wants = {n: R for n in partials}
    for n, s, x in zip(operands, subscripts, layouts):
        if index not in s:
            if isinstance(x, Shard):
                return replicate_all(node, lay, "einsum operands sharded on different indices")
            continue
        need = shard.with_dim(s.index(index))
        if isinstance(x, Replicate) or isinstance(x, Partial):
            wants[n] = need
        elif not same_placement(x, need):
            return replicate_all(node, lay, "einsum operands sharded on different indices")
    if index in output:
        return Decision(shard.with_dim(output.index(index)), wants)
    return Decision(P, wants)
