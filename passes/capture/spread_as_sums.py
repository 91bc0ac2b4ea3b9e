"""Standard deviations and variances over dims become the mean and the sum of squares they are.

Reads:  aten.std / aten.var nodes (their .default, .dim and .correction overloads) over dims of static
        sizes, node.meta["val"] of their input, and an aten.mean.dim of the same input over the same
        dims (keepdim) that the graph computes before them.
Writes: each replaced by the nodes below (meta["val"] and origin, fxtp.node_meta.ORIGIN, from the
        replaced node), reusing that mean where there is one; a float16 or bfloat16 input is cast to
        float32 first and the result back, as torch's own kernels accumulate.

    before                               after
    s = std(x, dims, correction=c)       m = mean(x, dims, keepdim=True);   d = sub(x, m)
                                         v = div(sum(mul(d, d), dims, keepdim), n - c);   s = sqrt(v)

Why: a sum (or mean) over a sharded dim has a rule, a Partial that is all-reduced where a whole value
is needed (fxtp/sharding/op_rules/reductions.py); a standard deviation has none, so its input had
to stay whole. Gemma 3n's activation sparsity cuts its MLP's gate at mean + k * std over the
intermediate features, which kept gate_proj replicated; as sums, the cut-off costs an all_reduce of
the mean and one of the sum of squares (one value per row each), and gate_proj is column-parallel.
Two passes (the mean, then the deviations) keep torch's accuracy, which one pass over the sums of x
and x * x would lose to cancellation. A count of zero or less (correction >= n) is left to torch.
"""
from __future__ import annotations

from math import prod
from typing import Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.operator_schemas import normalize_function

from fxtp.node_meta import replay

aten = torch.ops.aten
SPREADS = {aten.std.default: True, aten.std.dim: True, aten.std.correction: True,
           aten.var.default: False, aten.var.dim: False, aten.var.correction: False}  # -> whether a square root follows
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def spread_as_sums(gm: fx.GraphModule) -> fx.GraphModule:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in SPREADS:
            reduced = _reduced(node)
            if reduced is not None:
                _as_sums(gm.graph, node, *reduced, _earlier_mean(node, reduced[0], order))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _reduced(node: fx.Node) -> Optional[tuple[list[int], int, bool]]:
    """(dims, count n - correction, keepdim) of a std or var of real floats; None where a size is symbolic
    or the count is not positive."""
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
    shape = node.args[0].meta["val"].shape
    if not node.args[0].meta["val"].dtype.is_floating_point:
        return None
    dims = bound.get("dim")
    dims = sorted({d % len(shape) for d in dims}) if dims else list(range(len(shape)))
    if node.target in (aten.std.correction, aten.var.correction):
        correction = 1 if bound.get("correction") is None else bound["correction"]
    else:
        correction = int(bound.get("unbiased", True))
    if not all(isinstance(shape[d], int) for d in dims):
        return None
    count = prod(shape[d] for d in dims) - correction
    return (dims, count, bool(bound.get("keepdim", False))) if count > 0 else None


def _earlier_mean(node: fx.Node, dims: list[int], order: dict) -> Optional[fx.Node]:
    """A mean of the std's input over `dims` with keepdim that the graph computes before it: Gemma 3n's
    cut-off adds the mean it computes itself, which then needs no all_reduce of its own. A mean this pass
    made (not in `order`) is before it too: made for a std before it in the graph."""
    x = node.args[0]
    for user in x.users:
        if user.target is aten.mean.dim and order.get(user, -1) < order[node] and not user.kwargs and \
                len(user.args) == 3 and user.args[2] is True and \
                sorted(d % x.meta["val"].dim() for d in user.args[1]) == dims:
            return user
    return None


def _as_sums(graph: fx.Graph, node: fx.Node, dims: list[int], count: int, keepdim: bool,
             mean: Optional[fx.Node]) -> None:
    x = node.args[0]
    dtype = x.meta["val"].dtype
    fake_mode = detect_fake_mode([x.meta["val"]])

    def op(target, *args):
        return replay(graph, fake_mode, node, target, args, {})

    with graph.inserting_before(node):
        if dtype in _LOW_PRECISION:
            x, mean = op(aten.to.dtype, x, torch.float32), None
        mean = mean if mean is not None else op(aten.mean.dim, x, dims, True)
        deviation = op(aten.sub.Tensor, x, mean)
        value = op(aten.div.Tensor, op(aten.sum.dim_IntList, op(aten.mul.Tensor, deviation, deviation), dims, keepdim),
                   count)
        value = op(aten.sqrt.default, value) if SPREADS[node.target] else value
        value = op(aten.to.dtype, value, dtype) if dtype in _LOW_PRECISION else value
    node.replace_all_uses_with(value)
    graph.erase_node(node)
