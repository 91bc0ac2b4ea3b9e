"""A rank's step cut into one region per layer, so that torch.compile compiles each kind of layer once.

Compiling a whole 32-layer step makes inductor trace, lower and tune 32 copies of the same layer;
that is most of a cold start. Here the step's nodes are cut, in graph order, into contiguous runs:
a run ends where the first node reading a later layer's state (a weight, a KV-cache buffer) comes.
Each run becomes a graph of its own that takes the state it reads as arguments, so the runs of
layers built alike are the same code, and they share one compiled function. The step that calls the
runs stays an fx GraphModule: a few dozen calls a prefill, and nothing in a decode step, which is
replayed as a CUDA graph.

Runs keep the graph's order, so every in-place write (a KV cache's `index_copy_`) happens where it
did, and a layer whose graph differs from its neighbours' (the first one, a sliding-window layer) is
just another region compiled on its own; the final norm and the LM head are a region of their own, so
the last layer is one of its kind. Which
layer a state belongs to is read off its name; a wrong guess only costs sharing, never correctness.
"""
from __future__ import annotations

import itertools
import operator
import random
import re
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx

from fxtp.passes.node_match import writes
from fxtp.sharding.op_rules.helpers import view_chain

# the first number that is a whole component of a state's name: "model.layers.3.mlp.up_proj.weight",
# "transformer.h.3.attn.c_attn.weight", a KV cache's "kv_cache.key_3", a merged projection's
# "merged_model_layers_3_self_attn_q_proj_weight" (passes/decode/merge_projections.py)
LAYER_NUMBER = re.compile(r"(?:^|[._])(\d+)(?=[._]|$)")
_COMPILATIONS = itertools.count()
SIZE_QUERIES = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default)


def state_layer(name: str) -> int:
    """The layer whose state `name` is, or -1 for state of no layer (embeddings, the final norm)."""
    match = LAYER_NUMBER.search(name)
    return int(match.group(1)) if match else -1


def layer_runs(graph: fx.Graph) -> list[list[fx.Node]]:
    """The graph's computing nodes (all but placeholders, get_attr and the output) in order, cut
    before every node that reads a later layer's state than any node before it (read directly or
    through the values it takes; a size query reads none), and before the first node after a layer
    that reads state of no layer itself (the final norm's weight, the LM head), so the last layer is
    a run like the others and the head one of its own. Then a node that reads no layer's state and writes nothing moves
    to the end of the first run after its inputs' runs, unless a node between there and it writes
    what it reads: a rewrite that moved such nodes (a layer's positions, its rotary angles) across
    a cut in some layers and not others no longer makes those layers' runs differ."""
    layer: dict[fx.Node, int] = {}
    runs: list[list[fx.Node]] = [[]]
    last, tail = -1, False  # tail: the current run began at state of no layer, read after a layer's
    for node in graph.nodes:
        if node.op == "get_attr":
            layer[node] = state_layer(node.target)
        elif node.op in ("placeholder", "output"):
            layer[node] = -1
        else:
            reads_values = node.target not in SIZE_QUERIES  # a size read off state is no layer's
            layer[node] = max((layer[n] for n in node.all_input_nodes if reads_values), default=-1)
            reads_no_layer = any(n.op == "get_attr" and layer[n] == -1 for n in node.all_input_nodes)
            if runs[-1] and (layer[node] > last or reads_no_layer and last >= 0 and not tail):
                runs.append([])
                tail = layer[node] <= last
            last = max(last, layer[node])
            runs[-1].append(node)
    runs = [run for run in runs if run]
    run_of = {node: i for i, run in enumerate(runs) for node in run}
    position = {node: i for i, node in enumerate(graph.nodes)}
    writes = {node: {_root(n) for n in written} for node in run_of for written in [_written(node)] if written}
    for node in list(run_of):
        if layer[node] != -1 or node in writes:
            continue
        earliest = max((run_of[n] for n in node.all_input_nodes if n in run_of), default=0)
        reads = {_root(n) for n in node.all_input_nodes}
        if earliest < run_of[node] and not any(position[m] < position[node] and run_of[m] > earliest and roots & reads
                                               for m, roots in writes.items()):
            runs[run_of[node]].remove(node)
            runs[earliest].append(node)
            run_of[node] = earliest
    return runs


def _root(node: fx.Node) -> fx.Node:
    """The value whose memory `node` may share: back through getitem of multi-output ops and views."""
    while True:
        chain = view_chain(node)
        if chain:
            node = chain[-1].args[0]
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            return node


def _written(node: fx.Node) -> list[fx.Node]:
    """The values `node` may write in place (passes/node_match.py's `writes`), none for operator's
    functions (on sizes and multi-output ops' items)."""
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return []
    return [n for n in node.all_input_nodes if writes(node, n)]


class Region:
    """One run as a GraphModule (`module`) of the values it reads from outside it (`inputs`, in the
    order of first use), returning the values it computes at positions `returned` of the run
    (`outputs`)."""

    def __init__(self, run: list[fx.Node], returned: Iterable[int]):
        members = set(run)
        self.inputs = list(dict.fromkeys(n for node in run for n in node.all_input_nodes if n not in members))
        graph = fx.Graph()
        env = {n: graph.placeholder(f"input_{i}") for i, n in enumerate(self.inputs)}
        for node in run:
            # a name from the target only, so that the runs of layers built alike are the same code
            env[node] = graph.create_node(node.op, node.target, fx.map_arg(node.args, env.__getitem__),
                                          fx.map_arg(node.kwargs, env.__getitem__))
        self.outputs = [run[i] for i in sorted(returned)]
        graph.output(tuple(env[n] for n in self.outputs))
        self.module = fx.GraphModule(torch.nn.Module(), graph, class_name="LayerRegion")

    def key(self, module: fx.GraphModule, sized: Callable[[str], tuple[int, ...]]) -> tuple:
        """What regions share a compiled function by: their code, and the dtype and shape of the
        state they read, less the dims that `sized` says change from program to program (the other
        inputs may change shape from call to call), and its strides where no dim is sized."""
        state = tuple((i, t.dtype, tuple(None if d in sized(n.target) else size for d, size in enumerate(t.shape)),
                       None if sized(n.target) else t.stride())
                      for i, n in enumerate(self.inputs) if n.op == "get_attr" for t in [_state(module, n.target)])
        return self.module.code, state


def read_later(graph: fx.Graph, runs: list[list[fx.Node]]) -> set[fx.Node]:
    """The nodes of `runs` that a node of another run (or the output) reads."""
    members = {node: i for i, run in enumerate(runs) for node in run}
    return {n for node in graph.nodes for n in node.all_input_nodes
            if n in members and members.get(node, len(runs)) != members[n]}


def compile_by_layer(module: fx.GraphModule, compile_region: Callable[[fx.GraphModule], Callable],
                     compiled: Optional[dict[tuple, Callable]] = None,
                     sized: Callable[[str], tuple[int, ...]] = lambda name: ()) -> fx.GraphModule:
    """A GraphModule computing what `module` computes (and writing the same state in place), by
    calling its layer regions, each compiled with `compile_region` once per kind (Region.key); a step
    with fewer than two regions per kind (a 2-layer model) is one region. The
    state stays `module`'s tensors, so what updates them in place (a KV cache's reorder) is seen.
    State is marked static for dynamo, so under dynamic=True only the inputs' sizes vary, but for
    the dims `sized(name)` of state sized per program (a KV cache's batch and length).
    `compiled` holds the compiled regions by kind, and keeps them for the next program: a program
    of the same graph with a cache of another size then compiles nothing new (under dynamic=True)."""
    graph = module.graph
    runs = layer_runs(graph)
    parent = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            env[node] = parent.node_copy(node)
            if node.op == "get_attr":
                root[node.target] = _state(module, node.target)
                for dim in range(root[node.target].dim()):
                    if dim not in sized(node.target):
                        torch._dynamo.mark_static(root[node.target], dim)
    keys = _keys(module, runs, sized)
    if len(runs) < 2 * len(set(keys)):
        # too few alike layers to pay for a compilation per kind: one region (the whole step)
        runs = [[node for run in runs for node in run]]
        keys = _keys(module, runs, sized)
    # alike runs return what any of them returns: the last layer's residual, which only the other
    # layers' successors read, so that their code stays one
    returned: dict[tuple, set[int]] = {}
    later = read_later(graph, runs)
    for run, key in zip(runs, keys):
        returned.setdefault(key, set()).update(i for i, node in enumerate(run) if node in later)
    regions = [Region(run, returned[key]) for run, key in zip(runs, keys)]
    compiled = {} if compiled is None else compiled
    for i, (region, key) in enumerate(zip(regions, keys)):
        if key not in compiled:
            compiled[key] = _Seeded(compile_region(region.module))
        root[f"region_{i}"] = compiled[key]
        call = parent.call_module(f"region_{i}", tuple(env[n] for n in region.inputs))
        for j, out in enumerate(region.outputs):
            env[out] = parent.call_function(operator.getitem, (call, j))
    output = next(n for n in graph.nodes if n.op == "output")
    parent.output(fx.map_arg(output.args[0], env.__getitem__))
    step = fx.GraphModule(root, parent, class_name=f"{type(module).__name__}ByLayer")
    step.regions = len(runs)
    step.compiled_regions = len(set(keys))
    return step


def _keys(module: fx.GraphModule, runs: list[list[fx.Node]], sized: Callable[[str], tuple[int, ...]]) -> list[tuple]:
    """Each run's Region.key with every value it computes returned: alike runs' keys are equal
    whichever of their values later nodes read."""
    return [Region(run, range(len(run))).key(module, sized) for run in runs]


def _state(module: fx.GraphModule, target: str) -> torch.Tensor:
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"get_attr {target} is a {type(value).__name__}, not state: fxtp compiles a step whose "
                        "attributes are its weights and KV cache")
    return value


class _Seeded(torch.nn.Module):
    """A compiled region whose calls with inputs of a new shape (those that may compile) draw from
    Python's random state seeded for them alone. Inductor names symmetric-memory buffers by a
    random.randint drawn while compiling, and torch.compile restores the random state afterwards, so
    without a seed of their own two compilations in a row draw the same names for buffers of other
    sizes, which fails. The seeds follow the order of such calls, the same on every rank."""

    def __init__(self, compiled: Callable):
        super().__init__()
        self.compiled = compiled
        self.shapes: set[tuple] = set()

    def forward(self, *args):
        shapes = tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        if shapes in self.shapes:
            return self.compiled(*args)
        user_random = random.getstate()
        random.seed(f"fxtp-layer-region-{next(_COMPILATIONS)}")
        try:
            out = self.compiled(*args)
        finally:
            random.setstate(user_random)
        self.shapes.add(shapes)
        return out
