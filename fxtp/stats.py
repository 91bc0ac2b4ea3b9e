"""Structural facts about rank graphs: collectives per layer, state bytes per rank."""
from __future__ import annotations

import re
from collections import Counter

import torch
import torch.fx as fx

from fxtp.sharding import collectives

COLLECTIVE_TARGETS = {
    collectives.ALL_REDUCE: "all_reduce",
    collectives.all_gather_shard: "all_gather",
}
OUTSIDE_LAYERS = "(outside layers)"


def layer_of(node: fx.Node) -> str:
    """The outermost module on the node's stack that is an item of a ModuleList ('model.layers.3',
    'encoder.block.1'; not a T5 block's own sub-layer 'encoder.block.1.layer.0')."""
    for path, _ in node.meta.get("nn_module_stack", {}).values():
        if path.rsplit(".", 1)[-1].isdigit():
            return path.removeprefix("model.")  # capture wraps the model as `model`
    return OUTSIDE_LAYERS


def collectives_by_layer(gm: fx.GraphModule) -> dict[str, Counter]:
    """{layer: Counter({'all_reduce': 2})} over the collective nodes of a rank graph."""
    found: dict[str, Counter] = {}
    for node in gm.graph.nodes:
        kind = COLLECTIVE_TARGETS.get(node.target)
        if kind is not None:
            found.setdefault(layer_of(node), Counter())[kind] += 1
    return found


def in_layer(name: str) -> bool:
    """Whether a state name belongs to an item of a ModuleList (a decoder layer, an expert)."""
    return re.search(r"\.\d+\.", name) is not None


def state_bytes(module: torch.nn.Module, prefix: str = "", layers_only: bool = False) -> int:
    """Bytes of parameters (and buffers) under `prefix` in a module, optionally of layers only."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return sum(t.numel() * t.element_size() for name, t in tensors
               if name.startswith(prefix) and (in_layer(name) or not layers_only))


def planned_state_bytes(tp, rank: int, prefix: str = "") -> int:
    """Bytes of state that `rank` will hold, from the plan alone (works for models on meta); state
    no node reads (a tied table's other name) is not held."""
    from fxtp.node_meta import LAYOUT, STATE
    from fxtp.sharding.layouts import Shard

    total = 0
    for node in tp.graph.graph.nodes:
        if node.op == "placeholder" and STATE in node.meta and node.meta[STATE].startswith(prefix) and node.users:
            value, layout = tp.captured.state[node.meta[STATE]], node.meta[LAYOUT]
            numel = value.numel()
            if isinstance(layout, Shard):
                numel = numel // layout.global_size * layout.local_size(rank)
            total += numel * value.element_size()
    return total
