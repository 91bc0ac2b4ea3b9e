"""Automatic plan: find Megatron regions from the graph and seed their column-parallel weights.

Reads:  node.meta["val"], node.meta["fxtp.state"].
Writes: through `propagate`, the layouts of the accepted plan (see passes/propagate.py).
Returns a `Plan`: state name -> Layout seeds, plus one `Decision` per candidate group.

A candidate group is the set of projections (`linear` with a state weight) that read the same
value: q/k/v of an attention block, gate/up of an MLP, an lm_head alone. Each is tried as
column-parallel by propagating in strict mode: the group is accepted if every sharded value it
produces is consumed by shard-preserving ops and ends in row-parallel projections whose Partial
outputs are all-reduced; any need for an all_gather rejects it, with the reason. Nothing is
read from module names.

Shard sizes follow the graph's own view of each projection output: the first reshape that
splits its features (e.g. 64 -> [4 heads, 16]) gives the unit (16) so ranks never split inside
a head. Projections with fewer units (GQA's k/v) are sharded when their units divide evenly
over the ranks and otherwise kept replicated, q then takes uneven head-aligned shards.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Optional

import torch
import torch.fx as fx

from fxtp.capture import STATE
from fxtp.layouts import Layout, Replicate, Shard, balanced_counts
from fxtp.op_rules import permutation, val
from fxtp.reshape import dim_groups
from fxtp.passes.propagate import _PERMUTES, LAYOUT, PropagationError, propagate

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int}


@dataclass
class GroupDecision:
    weights: list[str]  # state names of the group's projection weights
    role: str           # "column-parallel", "row-parallel" or "replicated"
    reason: str = ""    # why it is replicated, or which members stay replicated and why

    @property
    def sharded(self) -> bool:
        return self.role == "column-parallel"


@dataclass
class Plan:
    seeds: dict[str, Layout] = field(default_factory=dict)
    groups: list[GroupDecision] = field(default_factory=list)


def projection_weight(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(weight state, its output-feature dim) when `node` multiplies an activation by a 2-D
    state matrix: linear(x, W[out, in]), mm(x, W[in, out]) (GPT-2 Conv1D), or
    matmul(x, W.T) (Falcon)."""
    if node.op != "call_function" or node.target not in (aten.linear.default, aten.mm.default, aten.matmul.default):
        return None
    weight = node.args[1]
    if not isinstance(weight, fx.Node) or val(weight).dim() != 2:
        return None
    out_dim = 0 if node.target is aten.linear.default else 1
    while weight.op == "call_function" and weight.target in _PERMUTES:
        out_dim = permutation(weight)[out_dim]
        weight = weight.args[0]
    if weight.op == "placeholder" and STATE in weight.meta and val(weight).dim() == 2:
        return weight, out_dim
    return None


def projection_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Projections (see projection_weight) grouped by the activation they read, in graph order."""
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if projection_weight(node) is not None:
            groups[node.args[0]].append(node)
    return list(groups.values())


def feature_unit(proj: fx.Node) -> int:
    """Elements per unit of a projection's output features: head_dim where a reshape splits
    them into heads, 1 where nothing does (an MLP's intermediate). Reshapes that keep the
    features whole (GPT-2's [b*s, 3h] -> [b, s, 3h]) and ops that keep the shape (OPT scales q
    before splitting heads) are followed."""
    frontier, seen = [(proj, val(proj).dim() - 1)], set()
    while frontier:
        node, dim = frontier.pop(0)
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if isinstance(val(user), torch.Tensor) and val(user).shape == val(node).shape:
                frontier.append((user, dim))  # elementwise: a bias, a scale, a cast
            elif user.target in _RESHAPES:
                for gi, gj in dim_groups(val(node).shape, val(user).shape) or ():
                    if gi == (dim,) and len(gj) == 1:
                        frontier.append((user, gj[0]))
                    elif gi == (dim,):
                        return int(prod(int(val(user).shape[d]) for d in gj[1:]))
    return 1


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
        note = (f"{', '.join(projection_weight(n)[0].meta[STATE] for n in dropped)} kept replicated: "
                f"{fewest} heads do not divide over {world_size} ranks")
        active = {n: u for n, u in active.items() if u != fewest}
    return {}, "no projections"


def plan(gm: fx.GraphModule, world_size: int) -> Plan:
    candidates: list[tuple[list[str], dict[str, Layout], str]] = []
    for group in projection_groups(gm):
        names = [projection_weight(n)[0].meta[STATE] for n in group]
        counts, note = choose_counts({n: val(n).shape[-1] // feature_unit(n) for n in group}, world_size)
        seeds = {}
        for n, c in counts.items():
            weight, out_dim = projection_weight(n)
            seeds[weight.meta[STATE]] = Shard(out_dim, c, feature_unit(n))
        candidates.append((names, seeds, note))

    result = Plan()
    propagate(gm, {})
    for group, (names, seeds, note) in zip(projection_groups(gm), candidates):
        if any(not isinstance(n.args[0].meta[LAYOUT], Replicate) for n in group):
            result.groups.append(GroupDecision(names, "row-parallel", "its input is sharded by the region before it"))
            continue
        if not seeds:
            result.groups.append(GroupDecision(names, "replicated", note))
            continue
        try:
            propagate(gm, {**result.seeds, **seeds}, strict=True)
        except PropagationError as e:
            result.groups.append(GroupDecision(names, "replicated", e.reason))
            propagate(gm, result.seeds)
            continue
        result.seeds.update(seeds)
        result.groups.append(GroupDecision(names, "column-parallel", note))
    propagate(gm, result.seeds)
    return result
