"""The model's tensors by their HF names, put together from every rank's parts: weights after training,
or gradients. The inverse of what rank_graph stores, which is for each state name (node.meta["fxtp.state"])
the rank's part under the name's Layout; a block that unfuse_projections cut from a fused weight
(state_names.derived_name) goes back into its place, and a tied weight is given under each of its names.
"""
from __future__ import annotations

import torch

from fxtp.capture.state_names import parse_derived
from fxtp.node_meta import LAYOUT, STATE
from fxtp.sharding.collectives import assemble, shard_args
from fxtp.sharding.layouts import Shard


def state_layouts(graph) -> dict:
    """{state name: Layout} of the state a program's graph reads."""
    return {n.meta[STATE]: n.meta[LAYOUT] for n in graph.graph.nodes if n.op == "placeholder" and STATE in n.meta
            and n.users}


def whole_state(program, per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{HF name: full tensor} from `per_rank[r]`, rank r's tensors by state name (a rank module's
    named_parameters(), or their .grad). Names the ranks do not hold are left out."""
    if len(per_rank) != program.world_size:
        raise ValueError(f"need the tensors of all {program.world_size} ranks, got {len(per_rank)}")
    whole: dict[str, torch.Tensor] = {}
    for name, layout in state_layouts(program.graph).items():
        if any(name not in tensors or tensors[name] is None for tensors in per_rank):
            continue
        parts = [tensors[name] for tensors in per_rank]
        value = assemble(parts, *shard_args(layout)) if isinstance(layout, Shard) else parts[0]
        derived = parse_derived(name)
        if derived is None:
            whole[name] = value
            continue
        source, dim, start, end = derived
        if source not in whole:
            whole[source] = value.new_zeros(program.captured.state[source].shape)
        whole[source].narrow(dim, start, end - start).copy_(value)
    for name in list(whole):
        for other in program.captured.aliases.get(name, ()):
            whole.setdefault(other, whole[name])
    return whole
