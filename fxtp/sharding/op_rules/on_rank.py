"""Values held on one rank alone (OnRank, fxtp.sharding.layouts): a loop over heads unrolled in the
graph (Zamba's Mamba mixer scans each head in turn) selects head i of a head-sharded value, computes
on it, and joins the heads' results again. Head i lies on the rank that owns it, so that rank runs
the iteration and the others skip it; the join, in head order, is the head shard again.

    before (global)                      rank r (owns head 1 of 2)
    h1 = select(x, 0, 1)  [b, d]         h1 = select(x_r, 0, 0)   (its first local head)
    y1 = f(h1, w)         [b, d]         y1 = f(h1, w)
    y  = cat([y0, y1], 1) [b, 2d]        y  = cat([y1], 1)        [b, d]: S(dim=1, counts=[1, 1], inner=d)

Such a value never moves (that would be a broadcast from its rank): where a node cannot use it as it
is (the graph output, a join out of rank order, a shard beside it), propagation takes the selects that
made it as select_whole instead (their input gathered, as for any op along a sharded dim).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT
from fxtp.sharding.layouts import OnRank, Replicate, Shard
from fxtp.sharding.op_rules.along_dim import along_dim
from fxtp.sharding.op_rules.helpers import is_tensor_node, ndim, norm_dim, tensor_inputs, val, written_inputs
from fxtp.sharding.op_rules.rule import Decision, LayoutOf

aten = torch.ops.aten
select_whole = along_dim(1, removes_dim=True)  # where the one rank's value could not serve: gathered first
_JOINS = (aten.cat.default, aten.stack.default)  # their rules are `joining`


_ALLOWED = contextvars.ContextVar("fxtp_values_on_one_rank", default=True)


@contextlib.contextmanager
def no_values_on_one_rank():
    """Plans made inside never hold a value on one rank alone (select_one is select_whole): a training
    graph's collectives (fxtp/sharding/training_collectives.py) are joined by every rank, and a rank
    skipping a loop's iteration would never join its backward's."""
    token = _ALLOWED.set(False)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def select_one(node: fx.Node, lay: LayoutOf) -> Decision:
    """select(x, dim, i): one element of the sharded dim is on the rank that owns it; elsewhere as along_dim."""
    src, dim, index = node.args[:3]
    layout = lay(src)
    if _ALLOWED.get() and isinstance(layout, Shard) and norm_dim(dim, ndim(src)) == layout.dim and isinstance(index, int) \
            and not layout.symbolic:
        size = layout.global_size
        return Decision(OnRank(layout.owner(index + size if index < 0 else index)[0], layout.world_size))
    return select_whole(node, lay)


def localize_select(node, args, kwargs, out, rank):
    """The owner's position of the selected element in its own part of the dim."""
    layout, index = node.args[0].meta.get(LAYOUT), args[2]
    if not isinstance(out, OnRank) or not isinstance(layout, Shard):
        return args, kwargs
    return (args[0], args[1], layout.owner(index + layout.global_size if index < 0 else index)[1], *args[3:]), kwargs


def reads_on_rank(node: fx.Node, lay: LayoutOf) -> bool:
    """Whether `node` reads a value held on one rank alone and is not a join of such values."""
    return node.target not in _JOINS and any(isinstance(lay(n), OnRank) for n in tensor_inputs(node))


def rank_local(node: fx.Node, lay: LayoutOf) -> Decision:
    """Any op reading values of one rank alone and replicated values runs on that rank alone, as it
    is (its inputs there are whole). A shard or Partial input would need a collective that the other
    ranks, skipping the node, never join; a write into a value the other ranks hold would leave theirs
    stale; a shape (sym_size) would be unknown to them: these refuse."""
    layouts = {n: lay(n) for n in tensor_inputs(node)}
    ranks = {x.rank for x in layouts.values() if isinstance(x, OnRank)}
    if len(ranks) > 1:
        raise ValueError(f"{node.target} reads values held on different ranks alone ({sorted(ranks)})")
    other = next((n for n, x in layouts.items() if not isinstance(x, (OnRank, Replicate))), None)
    if other is not None:
        raise ValueError(f"{node.target} reads {other.name}, {layouts[other]}, beside values held on one rank alone")
    if any(isinstance(layouts.get(n), Replicate) for n in written_inputs(node)):
        raise ValueError(f"{node.target} writes a replicated value from values held on one rank alone")
    out = next(x for x in layouts.values() if isinstance(x, OnRank))
    v = val(node)
    if isinstance(v, (tuple, list)):
        return Decision(tuple(out for _ in v))
    if isinstance(v, torch.Tensor):
        return Decision(out)
    if node.target is aten._assert_tensor_metadata.default:
        return Decision(None)
    raise ValueError(f"{node.target} of a value held on one rank alone gives no tensor, which the other ranks would lack")


def joining(rule):
    """cat/stack: where the pieces are values each on one rank, in the order of their ranks and all as
    large along `dim`, every rank holds its pieces joined, the Shard of `dim` whose unit is one piece (a
    rank with no piece would hold an empty part, whose shape it cannot make: refused). Otherwise `rule`."""

    def propagate(node: fx.Node, lay: LayoutOf) -> Decision:
        pieces = [n for n in node.args[0] if is_tensor_node(n)]
        layouts = [lay(n) for n in pieces]
        if not any(isinstance(x, OnRank) for x in layouts):
            return rule(node, lay)
        if not all(isinstance(x, OnRank) for x in layouts):
            raise ValueError(f"{node.target} joins values held on one rank alone with others")
        owners = [x.rank for x in layouts]
        counts = tuple(owners.count(r) for r in range(layouts[0].world_size))
        dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node))
        stacked = node.target is aten.stack.default
        sizes = {1 if stacked else val(n).shape[dim] for n in pieces}
        if owners != sorted(owners) or 0 in counts or len(sizes) != 1 or not isinstance(next(iter(sizes)), int):
            raise ValueError(f"{node.target} of pieces held on ranks {owners} ({sorted(map(str, sizes))} along "
                             f"dim {dim}): not a part of every rank, in rank order, as large")
        return Decision(Shard(dim, counts, inner=sizes.pop()))

    return propagate


def localize_join(node, args, kwargs, out, rank):
    """A rank joins the pieces it holds (the others' are None in its graph)."""
    if not any(isinstance(n.meta.get(LAYOUT), OnRank) for n in node.args[0]):
        return args, kwargs
    return ([a for a in args[0] if a is not None], *args[1:]), kwargs
