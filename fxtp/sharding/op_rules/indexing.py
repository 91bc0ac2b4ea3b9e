"""Lookups and writes by index: embedding (vocab-parallel tables), index (MoE token gathers),
index_copy (static KV cache updates), index_add (MoE outputs summed back into token order)."""
from __future__ import annotations

import torch
import torch.fx as fx

from fxtp.node_meta import WANTS
from fxtp.rank_ops.vocab_parallel import local_padding_idx, vocab_parallel_embedding
from fxtp.sharding.layouts import Partial, Replicate, Shard
from fxtp.sharding.op_rules.helpers import P, R, ndim, norm_dim, replicate_all, same_shape, shard_of, val, view_chain
from fxtp.sharding.op_rules.rule import Decision, LayoutOf


def embedding(node: fx.Node, lay: LayoutOf) -> Decision:
    """embedding(W[vocab, hidden], ids): hidden-sharded W or sharded ids pass through. A
    vocab-sharded W (contiguous rows per rank) with replicated ids gives a Partial that is
    all-reduced at once: each id is non-zero on one rank only, so the sum is exact."""
    w, ids = node.args[0], node.args[1]
    wl, il = lay(w), lay(ids)
    if isinstance(wl, Replicate) and isinstance(il, Replicate):
        return Decision(R)
    if isinstance(wl, Shard) and wl.dim == 1 and isinstance(il, Replicate):
        return Decision(wl.with_dim(ndim(node) - 1))
    if isinstance(wl, Replicate) and isinstance(il, Shard):
        return Decision(il)
    if isinstance(wl, Shard) and wl.dim == 0 and wl.inner == wl.outer == 1 and isinstance(il, Replicate):
        return Decision(P, reduce_now=True)
    return replicate_all(node, lay, "embedding with both table and ids sharded, or vocab rows not contiguous")


def vocab_parallel(node, args, kwargs, input_layout, rank, group_name):
    """Lowering of an embedding whose table is vocab-sharded: the rank's masked lookup
    (fxtp.rank_ops.vocab_parallel) from its first vocab row, with the padding row made local."""
    table = input_layout(node.args[0])
    if not (isinstance(table, Shard) and table.dim == 0):
        return node.target, args, kwargs
    start, rows = table.unit_start(rank), table.counts[rank]
    weight, ids, *rest = args
    if rest:
        rest[0] = local_padding_idx(rest[0], start, rows)
    elif "padding_idx" in kwargs:
        kwargs = {**kwargs, "padding_idx": local_padding_idx(kwargs["padding_idx"], start, rows)}
    return vocab_parallel_embedding, (weight, ids, start, table.global_size, *rest), kwargs


def index(node: fx.Node, lay: LayoutOf) -> Decision:
    """x[i0, i1, ...] (aten.index.Tensor) with replicated integer indices: a gather, so a Partial
    stays Partial (rows of a sum are the sums of rows) and a shard of a dim that is not indexed
    moves to where that dim lands (indexed dims adjacent; numpy moves scattered ones first)."""
    src, indices = node.args[0], node.args[1]
    wants = {i: R for i in indices if isinstance(i, fx.Node) and not isinstance(lay(i), Replicate)}
    layout = lay(src)
    if not isinstance(layout, Shard):
        return Decision(layout, wants)
    given = [k for k, i in enumerate(indices) if i is not None]
    if layout.dim in given or given != list(range(given[0], given[-1] + 1)) or \
            any(val(indices[k]).dtype in (torch.bool, torch.uint8) for k in given):
        return Decision(R, {src: R, **wants}, "index along or around the sharded dim")
    shift = 0 if layout.dim < given[0] else ndim(node) - ndim(src)
    return Decision(layout.with_dim(layout.dim + shift), wants)


def index_copy(node: fx.Node, lay: LayoutOf) -> Decision:
    """index_copy(self, dim, index, source): `source` is written into `self` along `dim` (a KV
    cache update), so `self` takes the layout of `source` on the other dims. In place, that want
    is met only by storing `self` in that layout (state settles to it; rewrite checks)."""
    target, dim, positions, source = node.args[:4]
    wants = {positions: R} if not isinstance(lay(positions), Replicate) else {}
    s = shard_of(source, lay)
    if s is None or s.dim == norm_dim(dim, ndim(target)):
        return Decision(R, {**wants, **{n: R for n in (target, source) if not isinstance(lay(n), Replicate)}},
                        "" if s is None else "index_copy along the sharded dim")
    return Decision(s, {**wants, target: s})


_ZEROS = (torch.ops.aten.zeros.default, torch.ops.aten.new_zeros.default, torch.ops.aten.zeros_like.default)


def index_add(node: fx.Node, lay: LayoutOf) -> Decision:
    """index_add(self, dim, index, source): rows of `source` added into `self` along `dim` (JetMoE's
    expert outputs back into token order). `source` sharded on another dim: `self` is sliced alike
    and the output keeps the shard. A Partial `source` added into zeros (or into a Partial) is a
    Partial: every rank adds its summand into its own zeros."""
    target, dim, positions, source = node.args[:4]
    wants = {positions: R} if not isinstance(lay(positions), Replicate) else {}
    have, s = lay(target), shard_of(source, lay)
    if s is not None and s.dim != norm_dim(dim, ndim(target)) and not isinstance(have, Partial):
        return Decision(s, {**wants, target: s})
    zeros = target.op == "call_function" and target.target in _ZEROS
    if isinstance(lay(source), Partial) and (isinstance(have, Partial) or isinstance(have, Replicate) and zeros):
        return Decision(P, wants)
    if isinstance(lay(source), Replicate) and isinstance(have, Replicate):
        return Decision(R, wants)
    return replicate_all(node, lay, "index_add along the sharded dim, or of a Partial into values other than zeros")


def copy_into(node: fx.Node, lay: LayoutOf) -> Decision:
    """copy_(dst, src): `src` written in place into `dst`, a view of a tensor the forward made (the
    gated delta rule's chunk loop writes rows of its buffers). `dst` keeps its layout, since a write
    into a moved copy of it would be lost; `src` is moved to match it: to `dst`'s layout where it has
    `dst`'s shape, replicated where it is broadcast along `dst`'s sharded dim, else sharded on that dim.
    A Partial `dst` (a write into a sum not yet taken), or a `dst` that is a view of a value the plan
    moves first (a copy, which the write would miss), cannot be expressed: the plan is refused there."""
    dst, src = node.args[:2]
    moved = next((view for view in view_chain(dst) if view.args[0] in view.meta.get(WANTS, {})), None)
    if moved is not None:  # propagation turns what a rule raises into a PropagationError naming the node
        raise ValueError(f"copy_ writes through {moved.name}, a view of a value the plan moves first "
                         f"({moved.args[0].name}, to {moved.meta[WANTS][moved.args[0]]}): the write would be lost")
    into = lay(dst)
    if isinstance(into, Replicate):
        return Decision(R, {src: R})  # propagation drops a want the value already meets
    if not isinstance(into, Shard):
        raise ValueError("copy_ into a Partial (a write into a sum not yet taken)")
    lead = ndim(dst) - ndim(src)
    along = None if into.dim < lead else val(src).shape[into.dim - lead]
    if same_shape(val(src), val(dst)):
        need = into
    elif along is None or isinstance(along, int) and along == 1:  # src broadcast along the sharded dim
        need = R
    else:
        need = into.with_dim(into.dim - lead)
    return Decision(into, {src: need})
