"""Projections: the nodes that multiply an activation by a state weight, which the planner shards.

Reads:  node.meta["val"], node.meta["fxtp.state"] on placeholders.

Rules work on ops, not modules, and one projection comes as several ops:
    linear(x, W[out, in])                      most projections
    mm(x, W[in, out])                          GPT-2's Conv1D
    matmul(W[out, in], x[..., in, s])          Mamba's dt_proj, features in rows
    matmul(x, W.T)                             Falcon
    grouped_mm(x[S, in], W[E, in, out], offs)  MoE experts, transformers' `grouped_mm` (W often W[E, out, in].T)
    bmm(W[ids][S, out, in], x[S, in, 1])       MoE experts, transformers' `batched_mm`: each routed row
    bmm(x[S, 1, in], W[ids][S, in, out])         multiplies its expert's weight, gathered by expert id
    bmm(x[E, T, in], W[E, in, out])            Llama 4's experts: the rows of each expert batched
    bmm(x[G, T, in], W.view(G, out, in).T)     a grouped linear (DeepSeek-V4's o_a_proj): group g of the
                                                 features multiplies its rows g*out:(g+1)*out of W[G*out, in]
    linear(x_e, select(W, 0, e))               JetMoE's experts: a loop over the experts, each a linear on
                                                 its rows (x split by expert) and its slice of W[E, out, in]
The unit of an expert's features is one element of its intermediate, as in an MLP. A grouped linear's
output features are those of one group, and its weight's rows hold them for every group in turn
(`ProjectionSite.groups`), so a column-parallel shard of them is an `outer` x G structure of W's rows.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from fxtp.node_meta import STATE
from fxtp.sharding.op_rules.contractions import GROUPED_MM
from fxtp.sharding.op_rules.helpers import calls, val
from fxtp.sharding.op_rules.views import PERMUTES, permutation

aten = torch.ops.aten
_BATCHED = (aten.bmm.default, aten.matmul.default)

__all__ = ["ProjectionSite", "projection_site", "projection_groups", "picks_expert"]


@dataclass(frozen=True)
class ProjectionSite:
    """Where a projection node keeps its operands."""
    weight: fx.Node      # the state placeholder of the weight
    weight_out: int      # the weight's dim of output features
    activation: fx.Node  # the activation multiplied by it
    out: int             # the node's own dim of output features
    groups: int = 1      # weight_out holds the output features of this many groups, one group after another


def projection_site(node: fx.Node) -> Optional[ProjectionSite]:
    """The ProjectionSite of `node` when it contracts an activation with a state weight (see the module
    docstring for the forms), else None."""
    if node.op != "call_function":
        return None
    if calls(node, GROUPED_MM):
        return _site(node, weight_arg=1, weight_dims=3, out_dim=2, out=1)
    if node.target in (aten.linear.default, aten.mm.default) or node.target is aten.matmul.default and val(node.args[1]).dim() == 2:
        return _site(node, weight_arg=1, weight_dims=2, out_dim=0 if node.target is aten.linear.default else 1, out=-1)
    if node.target is aten.matmul.default and val(node.args[0]).dim() == 2 and val(node).dim() >= 2:
        return _site(node, weight_arg=0, weight_dims=2, out_dim=0, out=-2)
    if node.target in _BATCHED and val(node).dim() == 3:
        # the state is the right operand (x @ W, features last) or the left one (W @ x, features in rows)
        return _site(node, weight_arg=1, weight_dims=3, out_dim=2, out=-1) or \
            _site(node, weight_arg=0, weight_dims=3, out_dim=1, out=1)
    return None


def _site(node: fx.Node, weight_arg: int, weight_dims: int, out_dim: int, out: int) -> Optional[ProjectionSite]:
    """`out_dim`: the output-feature dim of the operand at `weight_arg`, followed back to the state through
    transposes, a gather of whole experts (W[ids]) and a view of W's rows as groups; `out`: the node's
    output-feature dim (-1: its last)."""
    weight = node.args[weight_arg]
    if not isinstance(weight, fx.Node) or val(weight).dim() != weight_dims:
        return None
    batch, groups = 0, 1  # the dim of the operand that a bmm batches over, followed back like out_dim
    while weight.op == "call_function":
        if weight.target in PERMUTES:
            out_dim, batch = permutation(weight)[out_dim], permutation(weight)[batch]
        elif weight_dims == 3 and batch == 0 and out_dim == 1 and _groups_rows(weight):
            out_dim, weight_dims, groups = 0, 2, val(weight).shape[0]
        elif picks_expert(weight):
            out_dim, weight_dims = out_dim + 1, weight_dims + 1
        elif not _gathers_experts(weight):
            return None
        weight = weight.args[0]
    if weight.op == "placeholder" and STATE in weight.meta and val(weight).dim() == weight_dims:
        return ProjectionSite(weight, out_dim, node.args[1 - weight_arg], out % val(node).dim(), groups)
    return None


def _groups_rows(node: fx.Node) -> bool:
    """A view of a 2-d W[G*a, b] as [G, a, b]: its rows in G groups, each group's rows in a row of the
    batch that a bmm multiplies by the group's features."""
    src = node.args[0]
    if node.target not in (aten.view.default, aten.reshape.default) or not isinstance(src, fx.Node) \
            or val(src).dim() != 2 or val(node).dim() != 3:
        return False
    (rows, b), (groups, a, b_out) = val(src).shape, val(node).shape
    return b == b_out and groups * a == rows


def picks_expert(node: fx.Node) -> bool:
    """select(W, 0, e) of a 3-d W by a constant e: expert e's [a, b] of [E, a, b]."""
    return node.target is aten.select.int and val(node.args[0]).dim() == 3 and node.args[1] == 0 \
        and isinstance(node.args[2], int)


def _gathers_experts(node: fx.Node) -> bool:
    """W[ids] of a 3-d W by a 1-d index: [E, a, b] -> [S, a, b], every dim but the first kept in place."""
    if node.target is not aten.index.Tensor:
        return False
    indices = node.args[1]
    return val(node.args[0]).dim() == 3 and len(indices) == 1 and isinstance(indices[0], fx.Node) \
        and val(indices[0]).dim() == 1 and not val(indices[0]).dtype.is_floating_point \
        and val(indices[0]).dtype is not torch.bool


def projection_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Projections grouped by the activation they read, in graph order; the experts of a loop over
    them (each its own rows, its own select of one weight) by that weight, as one projection."""
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        site = projection_site(node)
        if site is not None:
            weight = node.args[1]
            groups[site.weight if isinstance(weight, fx.Node) and picks_expert(weight) else site.activation].append(node)
    return list(groups.values())
