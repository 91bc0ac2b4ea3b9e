"""Structural facts about rank graphs: collectives per layer, state bytes per rank."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from typing import Optional

import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT, STATE
from fxtp.sharding import collectives
from fxtp.sharding.layouts import local_numel

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


def collectives_per_layer_text(gm: fx.GraphModule) -> str:
    """The distinct numbers of collectives in a layer of a rank graph, as the benchmark tables show
    them ("2"; "3,8" where layers differ, hybrid models; "" where no layer has one)."""
    counts = {sum(c.values()) for layer, c in collectives_by_layer(gm).items() if layer != OUTSIDE_LAYERS}
    return ",".join(map(str, sorted(counts)))


def in_layer(name: str) -> bool:
    """Whether a state name belongs to an item of a ModuleList (a decoder layer, an expert)."""
    return re.search(r"\.\d+\.", name) is not None


def state_bytes(module: torch.nn.Module, prefix: str = "", layers_only: bool = False) -> int:
    """Bytes of parameters (and buffers) under `prefix` in a module, optionally of layers only."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return sum(t.numel() * t.element_size() for name, t in tensors
               if name.startswith(prefix) and (in_layer(name) or not layers_only))


def held_state(gm: fx.GraphModule) -> list[fx.Node]:
    """The state placeholders of an annotated global graph that ranks hold: those some node reads
    (a tied table's other name is read by none, and no rank stores it)."""
    return [n for n in gm.graph.nodes if n.op == "placeholder" and STATE in n.meta and n.users]


def planned_state_bytes(tp, rank: int, prefix: str = "", names: Optional[Collection[str]] = None) -> int:
    """Bytes of state under `prefix` (and among `names`, where given: parameters only, say) that
    `rank` will hold, from the plan's layouts and the global shapes alone: no rank graph is built
    and no weight read, so it works for models on meta."""
    total = 0
    for node in held_state(tp.graph):
        if node.meta[STATE].startswith(prefix) and (names is None or node.meta[STATE] in names):
            value, layout = tp.captured.state[node.meta[STATE]], node.meta[LAYOUT]
            total += local_numel(value.numel(), layout, rank) * value.element_size()
    return total
