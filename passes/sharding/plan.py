"""Automatic plan: find Megatron regions from the graph and seed their column-parallel weights.

Reads:  node.meta["val"], node.meta["fxtp.state"], node.meta["fxtp.tokens"].
Writes: through `propagate`, the layouts of the accepted plan (see passes/sharding/propagate.py).
Returns a `Plan`: state name -> Layout seeds, plus one `Decision` per candidate group.

A candidate group is the set of projections (passes/sharding/projections.py) that read the same
value: q/k/v of an attention block, gate/up of an MLP, an lm_head alone, the fused gate|up
of all experts of a MoE layer (one grouped or batched GEMM over [E, 2I, H]). Each is tried as
column-parallel by propagating in strict mode: the group is accepted if every sharded value it
produces is consumed by shard-preserving ops and ends in row-parallel projections whose Partial
outputs are all-reduced; any need for an all_gather rejects it, with the reason. Nothing is
read from module names. The one gather allowed is at the graph output: a group whose shard
flows through shard-preserving ops to the output (the lm_head: vocab-sharded logits) is
column-parallel (gathered). A rejected group is tried once more after all others are
decided: it may meet projections that come later (cross-attention k/v, grouped because all
read the encoder output, meet each decoder layer's q). Before the groups, each token embedding
table is tried as vocab-parallel (Shard(0), the lookup all-reduced at once); a tied table is the
lm_head's weight as well, so one vocab shard serves both (and a seq2seq model's encoder and
decoder lookups).

Shard sizes follow the graph's own view of each projection output: the first reshape that
splits its features (e.g. 64 -> [4 heads, 16]) gives the unit (16) so ranks never split inside
a head, and equal pieces split off the features (GPT-2's c_attn split into q, k, v) are
fused blocks: every rank gets its part of each block. Projections with fewer units (GQA's k/v) are sharded when their units divide evenly
over the ranks and otherwise kept replicated, q then takes uneven head-aligned shards.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from math import gcd, prod
from typing import Optional

import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT, STATE, TOKENS
from fxtp.sharding.layouts import Layout, Replicate, Shard, balanced_counts
from fxtp.sharding.op_rules.cut_and_join import PIECES, piece_bounds, strided_slice_step
from fxtp.sharding.op_rules.helpers import calls, norm_dim, same_shape, val
from fxtp.sharding.op_rules.views import PERMUTES, permutation
from fxtp.sharding.reshape import dim_groups
from fxtp.sharding.roles import Role
from fxtp.passes.sharding.projections import projection_groups, projection_site
from fxtp.passes.sharding.reassociate import reassociate_partials
from fxtp.passes.sharding.propagate import PropagationError, propagate

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int}
_SQUEEZES = {aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default}
# ops that cut one dim into a tuple of pieces -> the position of that dim's argument
_CUTS = {aten.tensor_split.indices: 2, aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.chunk.default: 2}


@dataclass
class GroupDecision:
    weights: list[str]  # state names of the group's projection weights
    role: Role
    reason: str = ""    # why it is replicated, or which members stay replicated and why
    dropped: list[str] = field(default_factory=list)  # members the planner kept replicated for what their shard met

    @property
    def sharded(self) -> bool:
        """Whether the planner seeded the group's weights with a Shard."""
        return self.role.seeds_shard


@dataclass
class Plan:
    seeds: dict[str, Layout] = field(default_factory=dict)
    groups: list[GroupDecision] = field(default_factory=list)


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
    into x and z after one)."""
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
                frontier.append((user, dim))
            elif user.target in _RESHAPES:
                for gi, gj in dim_groups(val(node).shape, val(user).shape) or ():
                    if gi == (dim,) and len(gj) == 1:
                        frontier.append((user, gj[0]))
                    elif gi == (dim,):
                        return 1, int(prod(int(val(user).shape[d]) for d in gj[1:]))
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


def _fused(node: fx.Node, dim: int, pieces: list[fx.Node]) -> tuple[int, int]:
    """Equal pieces that tile the features are blocks; each piece's own structure gives the unit."""
    bounds = sorted(b for p in pieces for b in piece_bounds(p, dim))
    size = int(val(node).shape[dim])
    lengths = {end - begin for begin, end in bounds}
    if len(lengths) != 1 or bounds[0][0] != 0 or bounds[-1][1] != size or \
            any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        return 1, 1  # unequal parts (e.g. GQA q|k|v in one weight): planned as one block
    outputs = [(g, dim) for p in pieces for g in (p.users if p.target is not aten.slice.Tensor else [p])]
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


def token_embeddings(gm: fx.GraphModule) -> list[fx.Node]:
    """Embeddings that look up token ids (inputs marked meta["fxtp.tokens"]: input_ids,
    decoder_input_ids; through reshapes) in a state table; position and token-type tables, indexed
    by an arange, the mask or token_type_ids, are not among them."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        table, ids = node.args[0], node.args[1]
        while isinstance(ids, fx.Node) and ids.op == "call_function" and ids.target in _RESHAPES:
            ids = ids.args[0]
        if table.op == "placeholder" and STATE in table.meta and isinstance(ids, fx.Node) \
                and ids.op == "placeholder" and ids.meta.get(TOKENS, False):
            found.append(node)
    return found


def plan_vocab_parallel(gm: fx.GraphModule, world_size: int, result: Plan) -> None:
    """Try each token embedding table as Shard(0) over balanced vocab rows: its lookup gives a
    Partial that is all-reduced at once (fxtp/sharding/op_rules/indexing.py). Accepted when strict propagation
    passes; a table tied to the lm_head is its weight too, whose logits are then all-gathered
    at the graph output (the lm_head group later finds the same seed)."""
    for node in token_embeddings(gm):
        table = node.args[0]
        name = table.meta[STATE]
        if name in result.seeds:
            continue  # a table shared by the encoder and the decoder (seq2seq), decided once
        seeds = {name: Shard(0, balanced_counts(val(table).shape[0], world_size))}
        try:
            propagate(gm, {**result.seeds, **seeds}, strict=True, gather_at_output=True)
        except PropagationError as e:
            result.groups.append(GroupDecision([name], Role.REPLICATED, e.reason))
            propagate(gm, result.seeds)
            continue
        result.seeds.update(seeds)
        tied = any(projection_site(u) is not None for u in table.users)
        note = "tied: the lm_head uses the same shard" if tied else ""
        result.groups.append(GroupDecision([name], Role.VOCAB_PARALLEL, note))


def column_role(group: list[fx.Node]) -> Role:
    """COLUMN_GATHERED when a shard computed from the group reaches the graph output through
    shard-preserving ops (an lm_head's vocab-sharded logits), else COLUMN_PARALLEL."""
    frontier = [n for n in group if isinstance(n.meta[LAYOUT], Shard)]
    seen = set(frontier)
    while frontier:
        for user in frontier.pop().users:
            if user.op == "output":
                return Role.COLUMN_GATHERED
            if user not in seen and isinstance(user.meta[LAYOUT], Shard):
                seen.add(user)
                frontier.append(user)
    return Role.COLUMN_PARALLEL


def column_seeds(projections: list[fx.Node], world_size: int) -> tuple[dict[str, Layout], str]:
    """{weight state: Shard on its output features} making `projections` column-parallel with
    head-aligned counts (empty when they cannot be split), and the planner's note."""
    structure = {n: feature_structure(n) for n in projections}
    counts, note = counts_by_unit(structure, world_size)
    seeds = {}
    for n, c in counts.items():
        site = projection_site(n)
        outer, unit = structure[n]
        seeds[site.weight.meta[STATE]] = Shard(site.weight_out, c, unit, outer)
    return seeds, note


def _try_column(gm: fx.GraphModule, group: list[fx.Node], names: list[str], seeds: dict[str, Layout], note: str,
                result: Plan) -> GroupDecision:
    """The decision on one group given the seeds accepted so far (added to when it is accepted).
    Where the shard of some members alone meets what cannot stay sharded (a MoE router beside
    the shared expert's gate/up it reads the same value as: its top-k over the experts), those
    members are kept replicated, the note says why, and the others are tried again; where the
    shards of all of them meet there, the narrower ones are kept replicated first."""
    if any(isinstance(projection_site(n).activation.meta[LAYOUT], Shard) for n in group):
        return GroupDecision(names, Role.ROW_PARALLEL, "its input is sharded by the region before it")
    notes, dropped = [note] if note else [], []
    while seeds:
        try:
            propagate(gm, {**result.seeds, **seeds}, strict=True, gather_at_output=True)
        except PropagationError as e:
            culprits = {projection_site(n).weight.meta[STATE] for n in _members_reaching(e.node, group)} & set(seeds)
            propagate(gm, result.seeds)
            if culprits == set(seeds):  # all of them meet there: the narrowest are kept replicated first
                culprits = _narrower(group, culprits)
            if not culprits:
                return GroupDecision(names, Role.REPLICATED, "; ".join(notes + [e.reason]))
            seeds = {name: layout for name, layout in seeds.items() if name not in culprits}
            notes.append(f"{', '.join(sorted(culprits))} kept replicated: {e.reason}")
            dropped += sorted(culprits)
            continue
        result.seeds.update(seeds)
        return GroupDecision(names, column_role(group), "; ".join(notes), dropped)
    return GroupDecision(names, Role.REPLICATED, "; ".join(notes))


def _members_reaching(node: fx.Node, group: list[fx.Node]) -> list[fx.Node]:
    """The members of `group` whose output reaches `node` through values that are not replicated, under
    the layouts of the attempt that failed at `node`: the projections whose shard it could not take."""
    members, found, seen = set(group), [], set()
    frontier = list(node.all_input_nodes)
    while frontier:
        n = frontier.pop()
        if n in seen or n.meta.get(LAYOUT) is None or n.meta[LAYOUT] == Replicate() or \
                isinstance(n.meta[LAYOUT], tuple) and all(x == Replicate() for x in n.meta[LAYOUT]):
            continue
        seen.add(n)
        if n in members:
            found.append(n)
        else:
            frontier.extend(n.all_input_nodes)
    return found


def _narrower(group: list[fx.Node], names: set[str]) -> set[str]:
    """Of the members named `names`, those whose output is narrower than the widest one's (MLA's
    low-rank kv_a beside q_proj, both meeting at the attention): none where all are as wide."""
    width = {projection_site(n).weight.meta[STATE]: _widest_output([n]) for n in group}
    widest = max(width[name] for name in names)
    return {name for name in names if width[name] < widest}


def _widest_output(group: list[fx.Node]) -> int:
    """The most features one of a candidate group's projections produces (the dim column-parallel
    splits): the widest, not their sum, since a group of several narrow projections (MLA's q_a and
    kv_a, both low-rank) splits no more usefully for having several."""
    return max((val(n).shape[-1] for n in group if isinstance(val(n).shape[-1], int)), default=0)


def plan(gm: fx.GraphModule, world_size: int) -> Plan:
    groups = projection_groups(gm)
    candidates = [(list(dict.fromkeys(projection_site(n).weight.meta[STATE] for n in group)),
                   *column_seeds(group, world_size))
                  for group in groups]

    result = Plan()
    propagate(gm, {})
    plan_vocab_parallel(gm, world_size, result)
    # Two groups conflict where one's shard would flow into the other's projections: a low-rank
    # bottleneck, MLA's q_a (hidden -> rank) before q_b (rank -> heads). Only one can be column-parallel,
    # and it should be the one that splits more features (q_b, by heads; the rank is small), so groups
    # are tried widest first; groups that meet no other are decided the same in any order.
    decisions: list = [None] * len(groups)
    for i in sorted(range(len(groups)), key=lambda i: -_widest_output(groups[i])):
        decisions[i] = _try_column(gm, groups[i], *candidates[i], result)
    # A group can meet projections decided after it: the k/v of every cross-attention read the
    # encoder output, which comes before any decoder layer's q. Rejected groups, and groups that
    # kept members replicated, are tried once more whole with every other decision in place.
    for i, (group, candidate) in enumerate(zip(groups, candidates)):
        if (decisions[i].role is Role.REPLICATED or decisions[i].dropped) and candidate[1]:
            decisions[i] = _try_column(gm, group, *candidate, result)
    result.groups += decisions
    propagate(gm, result.seeds)
    if reassociate_partials(gm):
        propagate(gm, result.seeds)
    return result
