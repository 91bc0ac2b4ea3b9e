"""`fxtp.dump(tp)`: the plan, every state tensor's and node's layout with global and local
shapes, the redistributions (collectives marked), and a summary a reviewer can check.

It reads no weight: state bytes per rank come from the plan, and the collectives are counted on
a rank graph whose state is on the meta device. A model compiled on meta (a 70B config with no
weights) therefore dumps the same text as the same model with its weights."""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT, NOTE, REDUCE, STATE, TOKENS, WANTS
from fxtp.passes.codegen.rank_graph import rank_graph
from fxtp.sharding import collectives
from fxtp.sharding.layouts import Shard
from fxtp.sharding.redistribute import steps
from fxtp.sharding.reshape import as_expr
from fxtp.capture.signatures import INPUTS
from fxtp.stats import collectives_by_layer, held_state, planned_state_bytes


class _SizeText:
    """Sizes as text, the symbolic ones in the names of the inputs they come from ("batch", "seq",
    "decoder_seq"). A big model's graph repeats a few symbolic sizes thousands of times and sympy's
    substitution is slow, so each distinct size is formatted once."""

    def __init__(self, gm: fx.GraphModule):
        self.symbols: dict[sympy.Expr, sympy.Symbol] = {}
        for node in gm.graph.nodes:
            # a HF model's inputs (the decoder's: [batch, decoder_seq]) and a plain module's token ids
            if node.op == "placeholder" and (node.name in INPUTS or node.meta.get(TOKENS, False)):
                batch, seq = node.meta["val"].shape
                tokens = INPUTS[node.name].tokens if node.name in INPUTS else "input_ids"
                for size, name in ((batch, "batch"), (seq, tokens.replace("input_ids", "seq"))):
                    if as_expr(size).is_Integer or as_expr(size) in self.symbols:
                        continue
                    if name != "batch" and sympy.Symbol(name) in self.symbols.values():  # a step's mask spans its KV cache
                        name = f"{node.name}_length"
                    self.symbols[as_expr(size)] = sympy.Symbol(name)
        self.texts: dict[sympy.Expr, str] = {}

    def size(self, size) -> str:
        e = as_expr(size)
        if e.is_Integer:
            return str(int(e))
        if e not in self.texts:
            self.texts[e] = str(self.symbols[e] if e in self.symbols else e.subs(self.symbols))
        return self.texts[e]

    def shape(self, shape) -> str:
        return "[" + ", ".join(map(self.size, shape)) + "]"


def local_shape(shape, layout, rank: int) -> list:
    shape = list(shape)
    if isinstance(layout, Shard):
        shape[layout.dim] = layout.local_size(rank)
    return shape


def _fmt_local(shape, layout, world_size: int, sizes: _SizeText) -> str:
    if not isinstance(layout, Shard):
        return ""
    locals_ = [sizes.shape(local_shape(shape, layout, r)) for r in range(world_size)]
    if len(set(locals_)) == 1:
        return f" -> {locals_[0]} per rank"
    return " -> " + " ".join(f"r{r}:{s}" for r, s in enumerate(locals_))


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    if isinstance(target, torch._ops.OpOverload):
        name = f"{target.namespace}.{target._schema.name.split('::')[-1]}"
        if target._overloadname != "default":
            name += f".{target._overloadname}"
    return name


def _move(have, want) -> str:
    return " + ".join(step for step, _ in steps(have, want))


def _graph_without_data(tp, rank: int) -> fx.GraphModule:
    """`rank`'s graph with its state on the meta device: the collectives it runs, for a model
    with or without weights, without copying a slice."""
    state = {name: value.to("meta") for name, value in tp.captured.state.items()}
    return rank_graph(tp.graph, state, rank, tp.world_size, collectives.SIMULATED_GROUP, torch.device("meta"))


def dump(tp, rank: int = 0) -> str:
    """The program `tp` as text; the collectives per layer are counted on `rank`'s graph (every
    rank runs the same ones)."""
    tp.check_rank(rank)
    gm, ws = tp.graph, tp.world_size
    sizes = _SizeText(gm)
    lines = [f"fxtp plan: {tp.model_type}, world_size={ws}", "", "Projection groups"]
    for group in tp.plan.groups:
        lines.append(f"  {group.role:16s} {', '.join(group.weights)}")
        if group.reason:
            lines.append(f"  {'':16s}   {group.reason.splitlines()[0]}")

    lines += ["", "State (global shape, layout, local shape)"]
    states = held_state(gm)
    for node in states:
        layout = node.meta[LAYOUT]
        shape = tp.captured.state[node.meta[STATE]].shape  # a step program's KV cache at its size
        lines.append(f"  {node.meta[STATE]:55s} {sizes.shape(shape):14s} {layout}{_fmt_local(shape, layout, ws, sizes)}")

    total = sum(tp.captured.state[n.meta[STATE]].numel() * tp.captured.state[n.meta[STATE]].element_size() for n in states)
    lines += ["", "Summary",
              f"  state tensors: {sum(isinstance(n.meta[LAYOUT], Shard) for n in states)} sharded, "
              f"{sum(not isinstance(n.meta[LAYOUT], Shard) for n in states)} replicated"]
    for r in range(ws):
        local = planned_state_bytes(tp, r)
        lines.append(f"  state bytes on rank {r}: {local:,} of {total:,} ({local / max(total, 1):.3f}; 1/N = {1 / ws:.3f})")
    by_layer = collectives_by_layer(_graph_without_data(tp, rank))
    if not by_layer:
        lines.append("  collectives: none")
    for layer, counts in by_layer.items():
        lines.append(f"  collectives in {layer}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))

    lines += ["", "Graph (layout, global shape -> local shape; '<-' marks a redistribution of an input)"]
    for node in gm.graph.nodes:
        if node.op == "placeholder" and STATE in node.meta or node.op == "call_function" and node.meta.get(LAYOUT) is None:
            continue  # state is listed above; nodes without a tensor output (size queries, asserts) are noise
        for src, want in node.meta.get(WANTS, {}).items():
            lines.append(f"    <- {_move(src.meta[LAYOUT], want)}({src.name}) to {want}")
        layout = node.meta.get(LAYOUT)
        value = node.meta.get("val")
        shape = value.shape if isinstance(value, torch.Tensor) else None
        shape_text = (sizes.shape(shape) + _fmt_local(shape, layout, ws, sizes)) if shape is not None else ""
        op = "output" if node.op == "output" else ("input" if node.op == "placeholder" else _op_name(node))
        layout_text = "" if layout is None else (", ".join(map(str, layout)) if isinstance(layout, tuple) else str(layout))
        note = f"   # {node.meta[NOTE]}" if node.meta.get(NOTE) else ""
        if node.meta.get(REDUCE):
            note = "   # Partial, all_reduce right here for all its users"
        lines.append(f"  {node.name:28s} {op:34s} {layout_text:34s} {shape_text}{note}")
    return "\n".join(lines)
