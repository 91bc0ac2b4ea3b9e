"""Run one small function through capture -> propagate -> rank_graph -> simulate and check it.

`run_op(fn, args, world_size)` registers every tensor in `args` as a buffer of a module whose
forward is `fn(**buffers)`, exports it, propagates the given seeds, builds every rank's graph
and runs them in lockstep. It then checks that

  * every rank's output equals `fn` on the full tensors (the graph output is Replicated), and
  * every node of the global graph is right on every rank: its local values, put together
    according to the layout its rule chose (R: each equals, P: sum, S: assemble), equal the
    value of the node in the unsharded graph, and a Shard's local shapes are its local sizes.

A Partial input (`arg(..., layout=P)`) arises the way it does in a model, from an op: the state
holds the rank summands stacked, [world_size, *shape], sharded one per rank along dim 0, and
`fn` receives its sum over dim 0, which the sum rule makes a Partial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from hypothesis import strategies as st

from fxtp.sharding import collectives
from fxtp.capture.export import flatten
from fxtp.node_meta import LAYOUT, REDUCE, STATE, WANTS
from fxtp.passes.capture.clean_up import clean_up
from fxtp.sharding.layouts import Layout, OnRank, Partial, Replicate, Shard, balanced_counts, held_by
from fxtp.passes.sharding.propagate import propagate
from fxtp.passes.codegen.rank_graph import rank_graph
from fxtp.runtime.simulate import simulate

aten = torch.ops.aten
R, P = Replicate(), Partial()
CPU = torch.device("cpu")
_PROBE = "fxtp-test-probe:"  # rank_graph keeps a node's stack_trace: it tells us which node is which


# ---------------------------------------------------------------------------- inputs

@dataclass
class Arg:
    value: torch.Tensor  # the full value, or for a Partial the rank summands stacked along dim 0
    layout: Layout

    @property
    def partial(self) -> bool:
        return isinstance(self.layout, Partial)

    @property
    def seed(self) -> Layout:
        return Shard(0, (1,) * self.value.shape[0]) if self.partial else self.layout


def values(gen: torch.Generator, shape: Sequence[int], kind: str = "any") -> torch.Tensor:
    """any: uniform [-2, 2); pos: uniform [0.5, 2); bool; int<N>: integers in [0, N)."""
    shape = tuple(shape)
    if kind == "bool":
        return torch.rand(shape, generator=gen) < 0.5
    if kind.startswith("int"):
        return torch.randint(0, int(kind[3:]), shape, generator=gen)
    u = torch.rand(shape, generator=gen)
    return u * 4 - 2 if kind == "any" else u * 1.5 + 0.5


def arg(gen: torch.Generator, shape: Sequence[int], layout: Layout = R, world_size: int = 1,
        kind: str = "any") -> Arg:
    if not isinstance(layout, Partial):
        return Arg(values(gen, shape, kind), layout)
    # summands of mixed sign (any) or positive ones that add up to a positive value (pos)
    return Arg(values(gen, [world_size, *shape], kind) / (world_size if kind == "pos" else 1), layout)


# ---------------------------------------------------------------------------- strategies

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def counts_st(draw, units: int, world_size: int) -> tuple[int, ...]:
    """Balanced counts, or a random split of `units` with at least one unit per rank."""
    if world_size == 1:
        return (units,)
    if draw(st.booleans()):
        return balanced_counts(units, world_size)
    cuts = sorted(draw(st.lists(st.integers(1, units - 1), min_size=world_size - 1,
                                max_size=world_size - 1, unique=True)))
    bounds = [0, *cuts, units]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


@st.composite
def shard_st(draw, size: int, dim: int, world_size: int, structured: bool = True) -> Shard:
    """A Shard of a dim of `size`: outer x units x inner with units >= world_size."""
    if not structured:
        return Shard(dim, draw(counts_st(size, world_size)))
    options = [(o, i) for o in divisors(size) for i in divisors(size // o) if size // o // i >= max(2, world_size)]
    outer, inner = draw(st.sampled_from(options))
    return Shard(dim, draw(counts_st(size // outer // inner, world_size)), inner, outer)


def shardable(shape: Sequence[int], world_size: int) -> list[int]:
    return [d for d, s in enumerate(shape) if s >= max(2, world_size)]


@st.composite
def layout_st(draw, shape: Sequence[int], world_size: int, partial: bool = False,
              dims: Optional[Sequence[int]] = None) -> Layout:
    """Replicate, a Shard of one of `dims` (default: any dim that can be split), or Partial."""
    dims = [d for d in (shardable(shape, world_size) if dims is None else dims)
            if shape[d] >= max(2, world_size)]
    choices = ["R"] + (["S", "S"] if dims else []) + (["P"] if partial else [])
    kind = draw(st.sampled_from(choices))
    if kind == "R":
        return R
    if kind == "P":
        return P
    d = draw(st.sampled_from(dims))
    return draw(shard_st(shape[d], d, world_size))


world_sizes = st.integers(1, 4)
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------- running

class _Op(torch.nn.Module):
    def __init__(self, fn: Callable, args: dict[str, Arg]):
        super().__init__()
        self.fn, self.partial = fn, {name: a.partial for name, a in args.items()}
        for name, a in args.items():
            self.register_buffer(name, a.value)

    def forward(self):
        return self.fn(**{name: getattr(self, name).sum(0) if partial else getattr(self, name)
                          for name, partial in self.partial.items()})


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n):
        self.values[n.name] = result = super().run_node(n)
        return result


@dataclass
class Run:
    gm: fx.GraphModule  # the global graph, annotated
    ranks: list[fx.GraphModule]
    outputs: list[torch.Tensor]  # every rank's output
    expected: torch.Tensor

    def nodes(self, target) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target == target]

    def node(self, target) -> fx.Node:
        """The last node calling `target` (the op under test comes after the sums that make Partials)."""
        found = self.nodes(target)
        assert found, f"no {target} node\n{self.describe()}"
        return found[-1]

    def layout(self, target) -> Layout:
        return self.node(target).meta[LAYOUT]

    def count(self, kind: str) -> int:
        """Collectives in rank 0's graph: 'all_reduce' or 'all_gather'."""
        target = {"all_reduce": collectives.ALL_REDUCE, "all_gather": collectives.all_gather_shard}[kind]
        return sum(1 for n in self.ranks[0].graph.nodes if n.op == "call_function" and n.target is target)

    def describe(self) -> str:
        lines = []
        for n in self.gm.graph.nodes:
            lay = n.meta.get(LAYOUT)
            lay = tuple(str(x) for x in lay) if isinstance(lay, tuple) else lay
            wants = {k.name: str(v) for k, v in n.meta.get(WANTS, {}).items()}
            lines.append(f"  {n.format_node()}  layout={lay} wants={wants}")
        return "\n".join(lines)


def run_op(fn: Callable, args: dict[str, Arg], world_size: int) -> Run:
    module = _Op(fn, args)
    ep = torch.export.export(module, (), strict=False)
    captured = clean_up(flatten(ep, CPU, user_inputs=(), prefix=""))
    gm = captured.graph_module
    propagate(gm, {name: a.seed for name, a in args.items() if not isinstance(a.seed, Replicate)})
    for node in gm.graph.nodes:
        if node.op != "output":
            node.meta["stack_trace"] = _PROBE + node.name

    recorder = _Recorder(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    recorder.run(*[captured.state[n.meta[STATE]] for n in placeholders])

    ranks, probed = [], []
    for r in range(world_size):
        ranked = rank_graph(gm, captured.state, r, world_size, collectives.SIMULATED_GROUP, CPU)
        probes: dict[str, fx.Node] = {}
        for n in ranked.graph.nodes:  # a node comes before the redistributions of its value
            trace = n.meta.get("stack_trace")
            if isinstance(trace, str) and trace.startswith(_PROBE) and n.op != "output":
                probes.setdefault(trace[len(_PROBE):], n)
        out = next(n for n in ranked.graph.nodes if n.op == "output")
        out.args = ((out.args[0], *probes.values()),)
        ranked.recompile()
        ranks.append(ranked)
        probed.append(list(probes))
    # a node computed on one rank alone (OnRank) is in that rank's graph only; a replicated value that only
    # such nodes read is left out of the others' graphs (nothing there reads it)
    by_name = {n.name: n for n in gm.graph.nodes}  # nodes first: a failure names the node
    everywhere = [n.name for n in gm.graph.nodes if any(n.name in p for p in probed)]
    for name in everywhere:
        layout = by_name[name].meta[LAYOUT]
        on = [r for r, p in enumerate(probed) if name in p]
        assert all(held_by(layout, r) for r in on), f"{name}, {layout}, is in the graphs of ranks {on}"
        assert on == list(range(world_size)) or isinstance(layout, (Replicate, OnRank, tuple)), \
            f"{name}, {layout}, is in the graphs of ranks {on} only"
    # rank_graph may fuse nodes (a bias add into its GEMM), but the result must stay traceable
    last = gm.graph.find_nodes(op="output")[0].args[0]
    assert last.name in everywhere, f"rank graphs lost track of {last.name} (rank_graph keeps meta['stack_trace'])"

    with torch.no_grad():
        results = simulate(ranks, (), {})
        expected = module()
    run = Run(gm, ranks, [res[0] for res in results], expected)
    for name in everywhere:
        node = by_name[name]
        # a Partial that propagate chose to all_reduce right where it is made is still a Partial
        # in the rank graph's node for it (the all_reduce follows it)
        layout = P if node.meta.get(REDUCE) else node.meta[LAYOUT]
        check_parts([res[1 + p.index(name)] for res, p in zip(results, probed) if name in p], recorder.values[name],
                    layout, f"node {node.format_node()}\n{run.describe()}")
    for r, output in enumerate(run.outputs):
        assert_close(output, expected, f"output of rank {r}\n{run.describe()}")
    return run


# ---------------------------------------------------------------------------- checks

def assert_close(actual, expected, what: str = "") -> None:
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not (expected.dtype.is_floating_point or expected.dtype.is_complex):  # complex: rounded like floats
        assert torch.equal(actual, expected), f"{what}: values differ"
        return
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def check_parts(parts: list, full, layout, what: str) -> None:
    """Rank-local values `parts`, reassembled according to `layout`, equal the global `full`."""
    if layout is None:
        return
    if isinstance(layout, tuple):
        assert isinstance(full, (tuple, list)) and len(full) == len(layout), what
        for k, sub in enumerate(layout):
            check_parts([p[k] for p in parts], full[k], sub, f"[{k}] {what}")
        return
    assert isinstance(full, torch.Tensor), f"{what}: layout {layout} for a {type(full).__name__}"
    if isinstance(layout, Replicate):
        for r, p in enumerate(parts):
            assert_close(p, full, f"rank {r} of a Replicate {what}")
    elif isinstance(layout, OnRank):  # `parts` holds the one rank's value
        assert len(parts) == 1, f"{what}: {layout} computed on {len(parts)} ranks"
        assert_close(parts[0], full, f"{layout} {what}")
    elif isinstance(layout, Partial):
        total = parts[0].clone()
        for p in parts[1:]:
            total = total + p
        assert_close(total, full, f"sum of a Partial {what}")
    else:
        assert layout.world_size == len(parts), f"{what}: {layout} on {len(parts)} ranks"
        assert layout.global_size == full.shape[layout.dim], f"{what}: {layout} of a dim of {full.shape[layout.dim]}"
        for r, p in enumerate(parts):
            want = list(full.shape)
            want[layout.dim] = layout.local_size(r)
            assert list(p.shape) == want, f"{what}: rank {r} holds {list(p.shape)}, {layout} says {want}"
        whole = collectives.assemble(parts, layout.dim, layout.counts, layout.inner, layout.outer)
        assert_close(whole, full, f"reassembled {layout} {what}")
