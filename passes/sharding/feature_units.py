"""How a projection's output features divide over ranks: the units that must stay whole (a head,
where a reshape splits the features into heads; one element where nothing does), the fused blocks
(GPT-2's [q|k|v]) each rank takes its part of, and the shard counts per rank that follow.

The planner (passes/sharding/plan.py) seeds column-parallel weights with these counts; the unfusing
of unequal pieces (passes/capture/unfuse_projections.py) reads `structure_along` too. Nothing here
writes node.meta: it reads node.meta["val"] and the graph's reshapes, cuts and permutes.
"""
from __future__ import annotations

from collections import defaultdict
from math import gcd, prod
from typing import Optional

import torch
import torch.fx as fx

from fxtp.node_meta import STATE
from fxtp.sharding.layouts import balanced_counts
from fxtp.sharding.op_rules.cut_and_join import PIECES, piece_bounds, strided_slice_step
from fxtp.sharding.op_rules.helpers import calls, norm_dim, same_shape, val
from fxtp.sharding.op_rules.views import PERMUTES, permutation
from fxtp.sharding.reshape import dim_groups
from fxtp.passes.sharding.projections import projection_site

aten = torch.ops.aten
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int}
_SQUEEZES = {aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default}
# ops that cut one dim into a tuple of pieces -> the position of that dim's argument
_CUTS = {aten.tensor_split.indices: 2, aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.chunk.default: 2}


def feature_structure(proj: fx.Node) -> tuple[int, int]:
    """(outer, unit) of a projection's output features: `outer` fused blocks (GPT-2's [q|k|v],
    Phi-3's [gate|up]), each of units of `unit` elements: head_dim where a reshape splits them
    into heads, 1 where nothing does (an MLP's intermediate), times aligned_units."""
    outer, unit = structure_along(proj, projection_site(proj).out)
    return outer, unit * aligned_units(proj, outer, unit)


def aligned_units(proj: fx.Node, outer: int, unit: int) -> int:
    """Units that make one unit for the kernel: aten._grouped_mm (MoE experts in bf16) needs
    16-byte rows, and the row-parallel one after `proj` reads each rank's features as rows, so
    they come in 16 bytes (8 bf16 elements). 1 for other ops or features that do not divide."""
    if not calls(proj, (aten._grouped_mm.default,)):
        return 1
    elements = 16 // val(proj).element_size()
    step = elements // gcd(elements, unit)
    return step if (val(proj).shape[-1] // outer) % (unit * step) == 0 else 1


def structure_along(start: fx.Node, start_dim: int) -> tuple[int, int]:
    """(outer, unit) of the features on dim `start_dim` of `start`, as feature_structure (without its
    alignment). Follows ops that keep the shape (a bias, OPT's q scaling, a cast), reshapes that
    keep the features whole (GPT-2's [b*s, 3h] -> [b, s, 3h]), squeezes of other dims (batched_mm
    experts' [S, 2I, 1] -> [S, 2I]) and transposes (Mamba's in_proj [b, s, 2I] -> [b, 2I, s] is cut
    into x and z after one). A value the features multiply elementwise gives its unit where a reshape merged
    its features from heads (`_unit_of_partner`)."""
    frontier, seen = [(start, start_dim)], set()
    while frontier:
        node, dim = frontier.pop(0)
        pieces = [u for u in node.users if u.target in PIECES and piece_bounds(u, dim) is not None]
        if pieces:
            return _fused(node, dim, pieces)
        steps = {strided_slice_step(u, dim) for u in node.users if u.target is aten.slice.Tensor}
        if len(steps) == 1 and None not in steps:
            return 1, steps.pop()  # interleaved pieces (GPT-OSS's gate|up): a unit holds one of each
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if isinstance(val(user), torch.Tensor) and same_shape(val(user), val(node)):
                unit = _unit_of_partner(user, node, dim)
                if unit is not None:
                    return 1, unit
                frontier.append((user, dim))
            elif user.target in RESHAPES:
                for gi, gj in dim_groups(val(node).shape, val(user).shape) or ():
                    if gi == (dim,) and len(gj) == 1:
                        frontier.append((user, gj[0]))
                    elif gi == (dim,) and gj:  # not a features dim of one element that the reshape drops
                        head = int(prod(int(val(user).shape[d]) for d in gj[1:]))
                        blocks = _axis_blocks(user, gj[0], gj[1], head, head // int(val(user).shape[gj[1]]))
                        return blocks if blocks is not None else (1, head)
                    elif gi and gi[-1] == dim and len(gj) > 1:
                        unit = _heads_across(val(node), dim, val(user), gj)
                        if unit > 1:
                            return 1, unit
            elif user.target in _SQUEEZES and (moved := dim_after_squeeze(user, dim)) is not None:
                frontier.append((user, moved))
            elif joins_rows(user, node, dim):
                frontier.append((user, dim))
            elif user.target in PERMUTES:
                frontier.append((user, permutation(user).index(dim)))
            elif _keeps_channels(user, node, dim):
                frontier.append((user, dim))
            elif user.target in _CUTS and norm_dim(_cut_dim(user), val(node).dim()) != dim:
                frontier += [(piece, dim) for piece in user.users]  # a cut of other dims (Mamba's of the sequence)
    return 1, 1


def _axis_blocks(reshaped: fx.Node, axis: int, rest: int, head: int, trailing: int) -> Optional[tuple[int, int]]:
    """(outer, unit) where a reshape split the features into `axis` (first) and the rest (from dim
    `rest` on: `head` elements an index of `axis`, `trailing` an index of `rest`) and `axis` is then
    cut into equal pieces: each piece is a block, as GPT-2's [q|k|v] pieces are. DiffLlama chunks its
    heads in two (a block of heads, unit `head`): v's before attention, q's and k's after it, once
    the outputs of its two attention calls are joined along the head dim (a join of another dim keeps
    the axis, so it is followed); Moshi views gate|up as [2, I] and selects each (a block of one index,
    whose unit is what structure_along finds on `rest` in the piece, times `trailing`). None where
    `axis` is not cut so (it holds heads)."""
    frontier, cuts, selects, seen = [(reshaped, axis, rest)], [], [], set()
    while frontier:  # every view of the axis: `qkv[:, :, i]` selects through slices of its own
        node, at, after = frontier.pop(0)
        for user in node.users:
            if user in seen:
                continue  # reached again, as DiffLlama's join is from each attention call
            seen.add(user)
            if user.target in PIECES and piece_bounds(user, at) is not None:
                cuts.append((user, at, after))
            elif user.target is aten.select.int and norm_dim(user.args[1], val(node).dim()) == at:
                selects.append((user, at, after))
            elif user.target in PERMUTES:
                order = permutation(user)
                frontier.append((user, order.index(at), order.index(after)))
            elif joins_rows(user, node, at):
                frontier.append((user, at, after))
            elif user.op == "call_function" and isinstance(val(user), torch.Tensor) and same_shape(val(user), val(node)):
                frontier.append((user, at, after))
    size = val(reshaped).shape[axis]
    bounds = sorted({b for cut, at, _ in cuts for b in piece_bounds(cut, at)} |
                    {(i % size, i % size + 1) for i in (select.args[2] for select, _, _ in selects) if isinstance(i, int)})
    if len(bounds) < 2 or not _equal_tiles(bounds, size):
        return None
    if bounds[0][1] > 1:  # pieces of several heads
        return len(bounds), head
    pieces = [(value, after) for cut, _, after in cuts for value in _piece_values(cut)] + \
        [(select, after - (after > at)) for select, at, after in selects]  # a select drops the axis
    inner = {structure_along(piece, d) for piece, d in pieces}
    if len(inner) != 1:
        return None
    outer, unit = inner.pop()
    return len(bounds) * outer, unit * trailing


def _unit_of_partner(user: fx.Node, node: fx.Node, dim: int) -> Optional[int]:
    """The unit of the features where `user` multiplies `node` elementwise with a value of the same shape whose
    features a reshape merged from [heads, unit]: both are sharded alike, so `node` takes that unit. Mamba-2's
    gate z multiplies the scan's heads flattened; the gated norm then views them as [groups, group size],
    which is no unit: its mean over a group split across ranks is a Partial (all-reduced), as vLLM's does."""
    if user.target not in (aten.mul.Tensor, aten.div.Tensor):
        return None
    for partner in user.all_input_nodes:
        if partner is not node and same_shape(val(partner), val(node)):
            return _merged_unit(partner, dim)
    return None


def _merged_unit(value: fx.Node, dim: int) -> Optional[int]:
    """The elements per index of the first dim that a reshape merged into dim `dim` of `value` ([.., h, d] ->
    [.., h * d]: d; [.., h, 1] -> [.., h]: 1), looking back through ops that keep `value`'s shape and joins of
    other dims; None where no such reshape made the features."""
    while value.op == "call_function":
        src = value.args[0] if value.args and isinstance(value.args[0], fx.Node) else None
        if value.target is aten.cat.default and len(value.args[0]) == 1:
            src = value.args[0][0]  # a cat of one value (a cache's prefix of nothing) is that value
        if value.target in RESHAPES and src is not None and val(src).dim() > val(value).dim():
            groups = dim_groups(val(src).shape, val(value).shape) or ()
            merged = next((gi for gi, gj in groups if gj == (dim,)), None)
            if merged is None or any(not gj and any(val(src).shape[d] != 1 for d in gi) for gi, gj in groups):
                return None
            if len(merged) == 1 and not any(not gj and gi[0] == merged[0] + 1 for gi, gj in groups):
                return None  # the features were one dim before: nothing merged into them
            inner = [val(src).shape[d] for d in range(merged[0] + 1, val(src).dim())]
            outer = [val(value).shape[d] for d in range(dim + 1, val(value).dim())]
            if not all(isinstance(s, int) for s in inner + outer):
                return None
            return prod(inner) // prod(outer)
        if src is None or not isinstance(val(src), torch.Tensor) or not same_shape(val(src), val(value)):
            return None
        value = src
    return None


def _heads_across(src: torch.Tensor, dim: int, out: torch.Tensor, out_dims: tuple[int, ...]) -> int:
    """The head size where a reshape merges the features (last of the merged dims) with dims before
    them and splits the result into heads: JetMoE's q [.., top_k, 2 * 64] -> [.., 2 * top_k, 64]. The
    largest trailing product of the split that divides the features (a head lies within them)."""
    features, unit, best = int(src.shape[dim]), 1, 1
    for d in reversed(out_dims[1:]):
        unit *= int(out.shape[d])
        best = unit if features % unit == 0 else best
    return best


def joins_rows(node: fx.Node, source: fx.Node, dim: int) -> bool:
    """Whether `node` joins `source` with other rows along a dim other than `dim`, so the features on
    `dim` stay in place: cat (JetMoE's per-expert outputs) and index_add of `source` (back in token order)."""
    if node.target is aten.cat.default:
        return norm_dim(node.args[1] if len(node.args) > 1 else 0, val(node).dim()) != dim
    if node.target is aten.index_add.default:
        return node.args[3] is source and norm_dim(node.args[1], val(node).dim()) != dim
    return False


def _cut_dim(cut: fx.Node) -> int:
    at = _CUTS[cut.target]
    return cut.args[at] if len(cut.args) > at else cut.kwargs.get("dim", 0)


def _keeps_channels(user: fx.Node, node: fx.Node, dim: int) -> bool:
    """Whether `user` keeps dim `dim` of `node` whole and in place while other dims change: a slice of
    another dim, a depthwise convolution of channels (Mamba's conv, which pads the sequence)."""
    out, src = val(user), val(node)
    if not isinstance(out, torch.Tensor) or out.dim() != src.dim() or out.shape[dim] != src.shape[dim]:
        return False
    if user.target is aten.slice.Tensor:
        return norm_dim(user.args[1], src.dim()) != dim
    groups = user.args[6] if len(user.args) > 6 else user.kwargs.get("groups", 1)
    return user.target is aten.conv1d.default and user.args[0] is node and dim == 1 and groups == src.shape[1]


def dim_after_squeeze(node: fx.Node, dim: int) -> Optional[int]:
    """Where dim `dim` of a squeeze's or unsqueeze's input lands in its output; None if it is squeezed
    away. (dim_groups pairs size-1 dims ambiguously, so these are followed by their dim arguments.)"""
    src = val(node.args[0])
    if node.target is aten.unsqueeze.default:
        return dim + (norm_dim(node.args[1], src.dim() + 1) <= dim)
    dims = [node.args[1]] if node.target is aten.squeeze.dim else node.args[1]
    removed = {d for d in (norm_dim(d, src.dim()) for d in dims) if src.shape[d] == 1}
    return None if dim in removed else dim - sum(d < dim for d in removed)


def _equal_tiles(bounds: list[tuple[int, int]], size: int) -> bool:
    """Whether sorted (start, end) pieces are all as long and tile [0, size) end to end."""
    return len({end - begin for begin, end in bounds}) == 1 and bounds[0][0] == 0 and bounds[-1][1] == size and \
        all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def _piece_values(cut: fx.Node) -> list[fx.Node]:
    """The values a cut makes: a slice is its piece; a split's or chunk's are its getitems."""
    return [cut] if cut.target is aten.slice.Tensor else list(cut.users)


def _fused(node: fx.Node, dim: int, pieces: list[fx.Node]) -> tuple[int, int]:
    """Equal pieces that tile the features are blocks; each piece's own structure gives the unit."""
    bounds = sorted(b for p in pieces for b in piece_bounds(p, dim))
    size = int(val(node).shape[dim])
    if not _equal_tiles(bounds, size):
        return 1, 1  # unequal parts (e.g. GQA q|k|v in one weight): planned as one block
    outputs = [(value, dim) for p in pieces for value in _piece_values(p)]
    structures = {structure_along(out, d) for out, d in outputs}
    if len(structures) != 1:
        return 1, 1
    outer, unit = structures.pop()
    return len(bounds) * outer, unit


def counts_by_unit(structure: dict[fx.Node, tuple[int, int]], world_size: int) -> tuple[dict, str]:
    """choose_counts for each set of a group's projections with the same unit size: only
    projections cut into the same units meet later (q and GQA k/v in attention, gate and up);
    Falcon's parallel attention puts q (heads) and the MLP (elements) in one group, and the MLP
    must not force q's head counts. A set whose counts are no multiples is split further."""
    by_unit: dict[int, list[fx.Node]] = defaultdict(list)
    for n, (outer, unit) in structure.items():
        by_unit[unit].append(n)
    counts, notes = {}, []
    for members in by_unit.values():
        units = {n: val(n).shape[projection_site(n).out] // (structure[n][0] * structure[n][1]) for n in members}
        chosen, note = choose_counts(units, world_size)
        if not chosen and len(members) > 1:
            for n in members:
                chosen_one, note = choose_counts({n: units[n]}, world_size)
                chosen.update(chosen_one)
        counts.update(chosen)
        notes += [note] if note else []
    return counts, "; ".join(notes)


def choose_counts(units: dict[fx.Node, int], world_size: int) -> tuple[dict[fx.Node, tuple[int, ...]], str]:
    """Per-rank unit counts for each projection of a group, or ({}, reason)."""
    active, note = dict(units), ""
    while active:
        fewest = min(active.values())
        if any(u % fewest for u in active.values()):
            return {}, f"unit counts {sorted(set(active.values()))} are not multiples of each other"
        larger = any(u > fewest for u in active.values())
        if fewest % world_size == 0 or (not larger and fewest >= world_size):
            base = balanced_counts(fewest, world_size)
            return {n: tuple(c * (u // fewest) for c in base) for n, u in active.items()}, note
        if not larger:
            return {}, f"{fewest} units cannot be split over {world_size} ranks"
        dropped = [n for n, u in active.items() if u == fewest]
        note = (f"{', '.join(projection_site(n).weight.meta[STATE] for n in dropped)} kept replicated: "
                f"{fewest} heads do not divide over {world_size} ranks")
        active = {n: u for n, u in active.items() if u != fewest}
    return {}, "no projections"
