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

Shard sizes follow the graph's own view of each projection output (passes/sharding/feature_units.py):
the first reshape that splits its features (e.g. 64 -> [4 heads, 16]) gives the unit (16) so ranks
never split inside a head, and equal pieces split off the features (GPT-2's c_attn split into q, k,
v) are fused blocks: every rank gets its part of each block. Projections with fewer units (GQA's
k/v) are sharded when their units divide evenly over the ranks and otherwise kept replicated, q
then takes uneven head-aligned shards.

Groups are tried widest first; where that leaves one replicated, the graph's order is planned too,
and the plan whose ranks hold fewer bytes is kept, or where both hold about as many, the one with
fewer all_reduces (`plan`, `_cheaper`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT, REDUCE, STATE, TOKENS, WANTS
from fxtp.sharding.layouts import Layout, Partial, Replicate, Shard, balanced_counts, local_numel
from fxtp.sharding.op_rules.helpers import val
from fxtp.sharding.roles import Role
from fxtp.passes.sharding.feature_units import RESHAPES, counts_by_unit, feature_structure
from fxtp.passes.sharding.projections import projection_groups, projection_site
from fxtp.passes.sharding.reassociate import reassociate_partials
from fxtp.passes.sharding.propagate import PropagationError, propagate, reusing_decisions

aten = torch.ops.aten


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


# ops whose output ids are their input's, some replaced by a constant id (Gemma 3n sends ids its per-layer
# table lacks to 0) -> the position of that input
_ID_REMAPS = {aten.where.ScalarOther: 1, aten.where.ScalarSelf: 2}


def token_embeddings(gm: fx.GraphModule) -> list[fx.Node]:
    """Embeddings that look up token ids (inputs marked meta["fxtp.tokens"]: input_ids,
    decoder_input_ids; through reshapes, and wheres that put a constant id in some places) in a state
    table; position and token-type tables, indexed by an arange, the mask or token_type_ids, are not
    among them."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        table, ids = node.args[0], node.args[1]
        while isinstance(ids, fx.Node) and ids.op == "call_function" and (ids.target in RESHAPES or ids.target in _ID_REMAPS):
            ids = ids.args[_ID_REMAPS.get(ids.target, 0)]
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
        seeds[site.weight.meta[STATE]] = Shard(site.weight_out, c, unit, outer * site.groups)  # each group's part
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
    with reusing_decisions():  # one propagation per group tried: most nodes keep their inputs' layouts
        return _plan(gm, world_size)


def _plan(gm: fx.GraphModule, world_size: int) -> Plan:
    groups = projection_groups(gm)
    candidates = [(list(dict.fromkeys(projection_site(n).weight.meta[STATE] for n in group)),
                   *column_seeds(group, world_size))
                  for group in groups]
    propagate(gm, {})
    vocab = Plan()
    plan_vocab_parallel(gm, world_size, vocab)
    # Two groups conflict where one's shard would flow into the other's projections: a low-rank
    # bottleneck, MLA's q_a (hidden -> rank) before q_b (rank -> heads). Only one can be column-parallel,
    # and it should be the one that splits more features (q_b, by heads; the rank is small), so groups
    # are tried widest first. Where that leaves a group replicated, the graph's order may do better
    # (a hybrid's mixer output column-parallel before its MLP): both are planned, and the cheaper is kept.
    widest_first = sorted(range(len(groups)), key=lambda i: -_widest_output(groups[i]))
    result = _decide(gm, groups, candidates, vocab, widest_first)
    if any(d.role is Role.REPLICATED or d.dropped for d in result.groups):
        in_graph_order = _decide(gm, groups, candidates, vocab, list(range(len(groups))))
        if _cheaper(_cost(gm, in_graph_order.seeds), _cost(gm, result.seeds)):
            result = in_graph_order
    propagate(gm, result.seeds)
    if reassociate_partials(gm):
        propagate(gm, result.seeds)
    return result


def _decide(gm: fx.GraphModule, groups: list, candidates: list, vocab: Plan, order: list[int]) -> Plan:
    """The plan of every group, tried in `order` after the vocab-parallel tables of `vocab`."""
    result = Plan(seeds=dict(vocab.seeds), groups=list(vocab.groups))
    propagate(gm, result.seeds)
    decisions: list = [None] * len(groups)
    for i in order:
        decisions[i] = _try_column(gm, groups[i], *candidates[i], result)
    # A group can meet projections decided after it: the k/v of every cross-attention read the
    # encoder output, which comes before any decoder layer's q. Rejected groups, and groups that
    # kept members replicated, are tried once more whole with every other decision in place.
    for i, (group, candidate) in enumerate(zip(groups, candidates)):
        if (decisions[i].role is Role.REPLICATED or decisions[i].dropped) and candidate[1]:
            decisions[i] = _try_column(gm, group, *candidate, result)
    result.groups += decisions
    return result


def _cost(gm: fx.GraphModule, seeds: dict) -> tuple[int, int]:
    """(bytes of state rank 0 holds, all_reduces) under `seeds`, propagated."""
    propagate(gm, seeds)
    held, reduces = 0, 0
    for node in gm.graph.nodes:
        if node.op == "placeholder" and STATE in node.meta and node.users:
            held += local_numel(val(node).numel(), node.meta[LAYOUT], 0) * val(node).element_size()
        reduces += bool(node.meta.get(REDUCE)) + sum(
            isinstance(n.meta.get(LAYOUT), Partial) and isinstance(want, Replicate)
            for n, want in node.meta.get(WANTS, {}).items())
    return held, reduces


def _cheaper(cost: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether a plan of `cost` beats one of `other`: fewer bytes held (what a decode step reads), and
    where both hold within 1% of each other, fewer all_reduces. MLA's low-rank q_a and kv_a sharded in
    place of q_b and kv_b hold about as much where the rank is near the heads' width (a tiny config),
    but then q_b's and kv_b's outputs are all-reduced and attention and o_proj run whole."""
    (held, reduces), (other_held, other_reduces) = cost, other
    if abs(held - other_held) > 0.01 * max(held, other_held):
        return held < other_held
    return reduces < other_reduces
