"""Sharding propagation: an analysis that gives every node a layout.

Reads:  node.meta["val"] (fake tensors from torch.export), node.meta["fxtp.state"] on
        placeholders that hold model state, and `seeds` (state name -> Layout).
Writes: node.meta["fxtp.layout"]  Layout, tuple of Layouts, or None for non-tensors
        node.meta["fxtp.wants"]   {input node: Layout} for inputs that must be redistributed
                                  before this node runs (only those that differ)
        node.meta["fxtp.note"]    why this node forced its inputs to Replicate ("" if it did not)
        node.meta["fxtp.reduce"]  True where a Partial output is all-reduced right after the node
                                  (its layout is then Replicate)
Ensures: every want is reachable (see fxtp.sharding.redistribute), a symbolic Shard (merged with batch,
        fxtp.sharding.layouts) is never all-gathered, a value held on one rank alone (OnRank) never
        moves; in strict mode no want needs an
        all_gather, so sharded regions close with all_reduce only (the Megatron pattern),
        except at the graph output when `gather_at_output` is set.
Replicated state whose users all want the same Shard becomes that Shard: the planner seeds
column-parallel weights, and row-parallel weights (and column biases) follow from the rules.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
from typing import Optional

import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT, NOTE, REDUCE, STATE, WANTS
from fxtp.sharding.layouts import Layout, Partial, Replicate, Shard, on_one_rank
from fxtp.sharding.op_rules.helpers import norm_dim, replicate_all, written_inputs
from fxtp.sharding.op_rules.on_rank import select_whole
from fxtp.sharding.op_rules.rule import Decision
from fxtp.sharding.op_rules.table import rule_for, rule_under
from fxtp.sharding.op_rules.views import PERMUTES
from fxtp.sharding.redistribute import needs_gather, same_layout
from fxtp.sharding.reshape import reshape_shard

aten = torch.ops.aten
# ops whose output is a view, a gather or an elementwise map of their first input, through which a want
# reaches state (Mamba's A = -exp(A_log), the depthwise conv's weight W.squeeze(1).unsqueeze(1) and a
# grouped linear's W.view(groups, out, in))
_RESHAPES = frozenset({aten.view.default, aten.reshape.default})
_STATE_VIEWS = PERMUTES | _RESHAPES | {aten.index.Tensor, aten.select.int, aten.squeeze.dim, aten.unsqueeze.default,
                                       aten.exp.default, aten.neg.default}


class PropagationError(RuntimeError):
    def __init__(self, node: fx.Node, reason: str):
        super().__init__(f"{reason} for node={node.format_node()}")
        self.node, self.reason = node, reason


def propagate(gm: fx.GraphModule, seeds: dict[str, Layout], strict: bool = False,
              gather_at_output: bool = False) -> fx.GraphModule:
    """Annotate every node; a Partial that one user all-reduces is reduced once, at its producer,
    for all users (otherwise a user that keeps the Partial would need a second all_reduce later:
    Gemma2's post-norms read the o_proj output twice). With `gather_at_output`, strict mode
    still lets the graph output all_gather a shard (a column-parallel lm_head's logits)."""
    reduce_at: set[fx.Node] = set()
    whole: set[fx.Node] = set()
    while True:
        stuck = _propagate_once(gm, seeds, strict, reduce_at, whole, gather_at_output)
        if stuck:
            whole |= stuck
            continue
        more = {n for n in gm.graph.nodes if n.meta.get(LAYOUT) == Partial()
                and any(isinstance(u.meta[WANTS].get(n), Replicate) for u in n.users)
                and any(n not in u.meta[WANTS] for u in n.users)}
        if not more:
            break
        reduce_at |= more
    _settle_state(gm)
    return gm


def _propagate_once(gm, seeds, strict, reduce_at, whole, gather_at_output) -> set[fx.Node]:
    """One pass; the selects in `whole` gather their input rather than leave a value on one rank alone
    (fxtp/sharding/op_rules/on_rank.py). Returns the selects whose values on one rank alone a node could not
    use as they are (it needed one moved, or its rule refused it): the next pass adds them to `whole`.
    Once one is found, the pass goes on only to find more: it raises nothing, and such a node is given
    replicated stand-ins."""
    decisions = _DECISIONS.get()
    stuck: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[LAYOUT] = seeds.get(node.meta.get(STATE), Replicate()) \
                if isinstance(node.meta.get("val"), torch.Tensor) else None
            node.meta[WANTS], node.meta[NOTE] = {}, ""
            continue
        if node.op == "output":
            decision = Decision(None, {n: Replicate() for n in node.all_input_nodes})
        else:
            try:
                decision = _decided(node, decisions, whole)
            except Exception as e:
                if not (stuck or _on_one_rank(node.all_input_nodes)):
                    raise PropagationError(node, f"propagation rule for {node.target} failed: {e!r}") from e
                decision = None
        wants = {} if decision is None else \
            {n: w for n, w in decision.wants.items() if not same_layout(n.meta[LAYOUT], w)}
        if decision is None or _on_one_rank(wants):  # a value on one rank alone that cannot serve here
            stuck |= _selects_making(_on_one_rank(node.all_input_nodes if decision is None else wants))
            node.meta[LAYOUT], node.meta[WANTS], node.meta[NOTE], node.meta[REDUCE] = \
                replicate_all(node, _layout).out, {}, "", False
            continue
        for n, w in wants.items():
            have = n.meta[LAYOUT]
            if not stuck and isinstance(have, Shard) and have.symbolic and needs_gather(have, w):
                raise PropagationError(node, f"{n.name} is {have}, merged with batch or sequence, and cannot "
                                             f"be all-gathered: {decision.note or 'a rule needs it whole'}")
        written = next((n for n in written_inputs(node) if n in wants and _read_elsewhere(n, node)), None)
        if not stuck and written is not None:
            raise PropagationError(node, f"{node.target} writes {written.name} in place, which other nodes read "
                                         f"(or views of it), but needs it as {wants[written]}, not "
                                         f"{written.meta[LAYOUT]}: the write would land in a copy they never see")
        if strict and not stuck and not (gather_at_output and node.op == "output"):
            for n, w in wants.items():
                if needs_gather(n.meta[LAYOUT], w):
                    why = decision.note or ("a sharded value reaches the graph output" if node.op == "output"
                                            else f"{node.target} needs {n.name} as {w}")
                    raise PropagationError(node, f"{n.name} is {n.meta[LAYOUT]} but {why}")
        node.meta[LAYOUT], node.meta[WANTS], node.meta[NOTE] = decision.out, wants, decision.note
        node.meta[REDUCE] = (node in reduce_at or decision.reduce_now) and isinstance(decision.out, Partial)
        if node.meta[REDUCE]:
            node.meta[LAYOUT] = Replicate()
    return stuck


def _read_elsewhere(written: fx.Node, writer: fx.Node) -> bool:
    """Whether a node after `writer` reads `written` or what it is a view of, or a view of them is
    read at all (their storage is one): in the unsharded graph it would see the write."""
    chain = [written]
    while _is_view(chain[-1]):  # up through the views `written` was made by
        chain.append(chain[-1].args[0])
    after = set(itertools.dropwhile(lambda n: n is not writer, writer.graph.nodes))
    return any(user is not writer and user not in chain and (user in after or _is_view(user))
               for n in chain for user in n.users)


def _is_view(node: fx.Node) -> bool:
    """Whether `node` returns its first input or a view of it (its schema's return aliases it: a view,
    or an in-place op, unlike view_chain's)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and bool(schema.returns) \
        and schema.returns[0].alias_info is not None and bool(node.args) and isinstance(node.args[0], fx.Node)


def _on_one_rank(nodes) -> list[fx.Node]:
    """Those of `nodes` held on one rank alone (OnRank, or a tuple of such values)."""
    return [n for n in nodes if on_one_rank(n.meta.get(LAYOUT))]


def _selects_making(values: list[fx.Node]) -> set[fx.Node]:
    """The nodes that first put `values` on one rank alone (the selects of one head of a head shard)."""
    found, seen, frontier = set(), set(), list(values)
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        on_one_rank = _on_one_rank(n.all_input_nodes)
        if on_one_rank:
            frontier += on_one_rank
        else:
            found.add(n)
    return found


# The planner propagates once per candidate group, and most nodes see the same layouts each time:
# inside `reusing_decisions`, a rule's decision is kept per node with the layouts it read, and reused
# while they are unchanged, which makes a plan several times as fast (a rule reads only its node,
# static meta and layouts through `lay`; copy_'s rule also reads the wants of its view chain, so it
# is always run).
_DECISIONS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("fxtp_rule_decisions", default=None)
_KEPT_DECISIONS = 4  # per node: a few configurations alternate while groups are tried
_ALWAYS_RUN = frozenset({aten.copy_.default})


@contextlib.contextmanager
def reusing_decisions():
    """Propagations inside reuse the rules' decisions on nodes whose inputs' layouts are unchanged."""
    token = _DECISIONS.set({})
    try:
        yield
    finally:
        _DECISIONS.reset(token)


def _layout(n: fx.Node):
    return n.meta[LAYOUT]


def _decided(node: fx.Node, decisions: Optional[dict], whole: set[fx.Node]) -> Decision:
    """The rule's decision on `node` under the layouts its inputs hold now."""
    if node in whole:
        return select_whole(node, _layout)
    if decisions is None:
        return rule_under(node, _layout).propagate(node, _layout)
    kept = decisions.setdefault(node, [])
    for read, decision in kept:
        if all(n.meta[LAYOUT] == layout for n, layout in read):
            return decision
    read: list[tuple[fx.Node, Layout]] = []

    def recording(n: fx.Node):
        read.append((n, n.meta[LAYOUT]))
        return n.meta[LAYOUT]

    decision = rule_under(node, recording).propagate(node, recording)
    if node.target not in _ALWAYS_RUN:
        kept.insert(0, (tuple(read), decision))
        del kept[_KEPT_DECISIONS:]
    return decision


def _settle_state(gm: fx.GraphModule) -> None:
    """Store replicated state pre-sliced when every user wants the same Shard of it. A want on a
    transpose of state (Falcon's matmul(x, W.T)), on a gather of it (batched_mm's experts
    W[ids]), on one expert of it (JetMoE's select(W, 0, e)) or on a map of its elements (-exp(A_log))
    moves to the state first, to the dim that the op's own rule carries to the wanted one; views of
    views settle last first."""
    for node in reversed(gm.graph.nodes):
        if node.target in _STATE_VIEWS and _views_state(node):
            wanted = _common_want(node)
            source = node.args[0]
            held = None if wanted is None else _source_shard(node, wanted)
            if held is not None:
                _drop_wants(node)
                node.meta[LAYOUT] = wanted
                node.meta[WANTS][source] = held
    for node in gm.graph.nodes:
        if is_state(node):
            wanted = _common_want(node)
            if wanted is not None:
                _drop_wants(node)
                node.meta[LAYOUT] = wanted


def _views_state(node: fx.Node) -> bool:
    """Whether `node` reads state through views (_STATE_VIEWS) alone."""
    while node.target in _STATE_VIEWS:
        node = node.args[0]
    return is_state(node)


def _source_shard(node: fx.Node, wanted: Shard):
    """The Shard of node's (replicated) first input from which node's rule gives `wanted`, or None. A
    reshape's is the wanted one reshaped back (its units regrouped: [G*out, in] -> [G, out, in]); the
    other ops keep the units, and the rule says on which dim."""
    source, rule = node.args[0], rule_for(node)
    shape = source.meta["val"].shape
    held_on = [wanted.with_dim(dim) for dim in range(len(shape))]
    if node.target in _RESHAPES:
        held_on = [reshape_shard(wanted, node.meta["val"].shape, shape)]
    for held in held_on:
        if held is None:
            continue
        decision = rule.propagate(node, lambda n: held if n is source else n.meta[LAYOUT])
        if not decision.wants and isinstance(decision.out, Shard) and same_layout(decision.out, wanted):
            return held
    return None


def is_state(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder" and STATE in node.meta


def _common_want(node: fx.Node):
    """The Shard every user of a replicated node wants, or None. A check of its dtype (`.float()` of a
    float parameter leaves one) reads no values, and nor does the size of a dim the Shard keeps whole
    (a KV cache's length, which a step with a cache of any length reads from the cache)."""
    if not isinstance(node.meta[LAYOUT], Replicate):
        return None
    sizes = [u for u in node.users if u.target is aten.sym_size.int]
    wanted = [u.meta[WANTS].get(node) for u in node.users
              if u.target is not aten._assert_tensor_metadata.default and u not in sizes]
    first = wanted[0] if wanted else None
    if not isinstance(first, Shard) or not all(w is not None and same_layout(w, first) for w in wanted):
        return None
    if any(norm_dim(u.args[1], node.meta["val"].dim()) == first.dim for u in sizes):
        return None
    return first


def _drop_wants(node: fx.Node) -> None:
    """Forget the users' wants of `node`, once it is stored in the layout they want."""
    for u in node.users:
        u.meta[WANTS].pop(node, None)
