"""Rewrite the annotated global graph into the graph of one rank.

Reads:  node.meta["fxtp.layout"], ["fxtp.wants"] (from passes/sharding/propagate.py), ["fxtp.state"].
Writes: a new GraphModule whose state attributes hold only this rank's slices (named by their
        HF names; state no node reads is left out), whose shape constants are local (op_rules'
        localize), whose ops are a rank's own where a rule lowers them (op_rules' lower), whose
        torch.device constants name the target device, with ops the device lacks replaced
        (fxtp/rank_ops/device_ops.py), and with a redistribution before every node that
        wanted one. Each new node carries meta["fxtp.layout"] and, for collectives,
        meta["fxtp.collective"] naming the value it moves. A node held on another rank alone
        (OnRank: an iteration over heads that rank owns) is left out, and a join reads only its own pieces. With `training`, the collectives are
        the differentiable ones (fxtp/sharding/training_collectives.py), and a floating value read
        as Replicate by a node whose output is sharded or Partial is read through reduce_gradient,
        which all-reduces the rank's share of its gradient in backward (Megatron's f). User inputs
        that may be None (masks, token types: fxtp/signatures.INPUTS) default to None and are
        checked and filled first.
        The clean-ups that follow (passes/codegen/rank_graph.py) are not part of it.

    before (global)                     after (rank r of 2)
    q = linear(x, Wq)   [b,s,64]        q = linear(x, Wq_r)              [b,s,32]
    v = view(q, [b,s,-1,16])            v = view(q, [b,s,-1,16])
    e = expand(k, [b,2,2,s,16])         e = expand(k, [b,1,2,s,16])
    o = linear(a, Wo)   (Partial)       o = linear(a, Wo_r); o = wait(all_reduce(o))
    h = add(res, o)                     h = add(res, o)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx

from fxtp.rank_ops import device_ops, inputs
from fxtp.sharding import collectives, training_collectives
from fxtp.sharding.collectives import shard_args
from fxtp.node_meta import COLLECTIVE, LAYOUT, REDUCE, STATE, WANTS, copy_origin
from fxtp.sharding.layouts import Layout, Partial, Replicate, Shard, held_by
from fxtp.sharding.op_rules.helpers import written_inputs
from fxtp.sharding.op_rules.table import rule_under
from fxtp.passes.sharding.propagate import is_state
from fxtp.sharding.redistribute import steps
from fxtp.capture.signatures import INPUTS

aten = torch.ops.aten


class RewriteError(RuntimeError):
    pass


def slice_state(value: torch.Tensor, layout: Layout, rank: int) -> torch.Tensor:
    if isinstance(layout, Shard):
        return collectives.local_part(value, *shard_args(layout), rank)
    return value


def own_state(value: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
    """`value`, a rank's part of the state tensor `entry`, as the rank holds it: a new Parameter object
    (no grad, the same memory) where `entry` is a parameter, so that nothing the rank does to it
    reaches the model's own object."""
    return torch.nn.Parameter(value, requires_grad=False) if isinstance(entry, torch.nn.Parameter) else value


def set_state(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Hold `value` in `root` under the dotted state name `name`, with a plain Module for each missing
    level: a Parameter as a parameter, anything else as a buffer."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)


def _on_device(x, device: torch.device):
    return device if isinstance(x, torch.device) else x


def rewrite_for_rank(gm: fx.GraphModule, state: dict[str, torch.Tensor], rank: int, world_size: int,
                     group_name: str, device: torch.device,
                     load: Optional[Callable[[str, Layout], torch.Tensor]] = None,
                     training: bool = False) -> fx.GraphModule:
    """`state` holds the full tensors (real or meta); `load(name, layout)`, when given, returns this
    rank's part of a state tensor, on `device` and contiguous, instead of slicing `state`: a
    Parameter it returns is held as it is, so the graphs of one rank can share their parameters."""
    _check_in_place_updates(gm)
    # graphs of user-facing inputs check them; fxtp.runtime.generation feeds the static-cache step graph itself
    checks_inputs = all(n.name in INPUTS for n in gm.graph.nodes if n.op == "placeholder" and STATE not in n.meta)
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    moved: dict[tuple[fx.Node, str], fx.Node] = {}
    optional = False  # inputs from the first one with a default on get default None

    def reducing_gradient(src: fx.Node, x: Optional[fx.Node] = None) -> fx.Node:
        """x (default env[src]), a value of src read as Replicate, through reduce_gradient where training
        needs it (see the module docstring); one such node per value."""
        x = env[src] if x is None else x
        if not training or world_size == 1 or not _is_floating(src):
            return x
        key = (x, "reduce_gradient")
        if key not in moved:
            moved[key] = graph.call_function(training_collectives.reduce_gradient, (x, group_name))
            moved[key].meta[LAYOUT] = Replicate()
            moved[key].meta[COLLECTIVE] = src.name
            copy_origin(src, moved[key])
        return moved[key]

    def read(n: fx.Node, user: fx.Node) -> Optional[fx.Node]:
        if not held_by(n.meta.get(LAYOUT), rank):
            return None  # computed on another rank alone: only a join reads it (op_rules/on_rank.py drops it)
        want = user.meta.get(WANTS, {}).get(n)
        if want is not None:
            return redistribute(n, want)
        if isinstance(n.meta.get(LAYOUT), Replicate) and _splits(user):
            return reducing_gradient(n)
        return env[n]

    def redistribute(src: fx.Node, want: Layout, have: Optional[Layout] = None) -> fx.Node:
        key = (src, str(want))
        if key in moved:
            return moved[key]
        x = env[src]
        have = src.meta[LAYOUT] if have is None else have
        for step, after in steps(have, want):
            if step == "slice":
                x = reducing_gradient(src, x)
                new_nodes = [_emit_slice(graph, x, after, rank)]
            elif world_size == 1:
                continue  # a collective over one rank is the identity
            elif step == "all_reduce":
                if training:
                    new_nodes = [graph.call_function(training_collectives.reduce_partial, (x, group_name))]
                else:
                    reduced = graph.call_function(collectives.ALL_REDUCE, (x, "sum", group_name))
                    new_nodes = [reduced, graph.call_function(collectives.WAIT, (reduced,))]
            elif training:
                new_nodes = [graph.call_function(training_collectives.gather_shard,
                                                 (x, *shard_args(have), group_name, rank))]
            else:
                new_nodes = [graph.call_function(collectives.all_gather_shard, (x, *shard_args(have), group_name))]
            for new in new_nodes:
                new.meta[LAYOUT] = after
                new.meta[COLLECTIVE] = src.name
                copy_origin(src, new)  # a collective belongs to the module that produced its input
            x = new_nodes[-1]
        moved[key] = x
        return x

    for node in gm.graph.nodes:
        if not held_by(node.meta.get(LAYOUT), rank):
            continue  # on another rank alone (an iteration of a loop over heads this rank does not own)
        if node.op == "placeholder" and STATE in node.meta and not node.users:
            continue  # state the graph never reads, e.g. a tied table's other name: not stored
        if node.op == "placeholder" and STATE in node.meta:
            name = node.meta[STATE]
            if load is not None:
                value = load(name, node.meta[LAYOUT])
            else:
                value = own_state(slice_state(state[name], node.meta[LAYOUT], rank).to(device).contiguous(), state[name])
            set_state(root, name, value)
            new = graph.get_attr(name)
        elif node.op == "placeholder":
            spec = INPUTS.get(node.name) if checks_inputs else None
            optional = optional or (spec is not None and spec.fill is not None)  # later ones too: Python's order
            new = graph.placeholder(node.name, default_value=None) if optional else graph.placeholder(node.name)
            if spec is not None and spec.fill is not None:
                ids = env[_placeholder(gm, spec.tokens)]
                new = graph.call_function(inputs.checked_inputs, (ids, new, device, (spec.tokens, node.name), spec.fill))
        elif node.op == "get_attr":  # a submodule or constant export kept as an attribute
            setattr(root, node.target, getattr(gm, node.target))
            new = graph.get_attr(node.target)
        elif node.op == "output":
            new = graph.output(fx.map_arg(node.args[0], lambda n: read(n, node)))
        elif node.target is aten._assert_tensor_metadata.default:
            continue  # checks dtype/device of the capture-time tensors; inputs.checked_inputs covers users' ones
        else:
            args = fx.map_arg(node.args, lambda n: read(n, node))
            kwargs = fx.map_arg(node.kwargs, lambda n: read(n, node))
            rule, target = rule_under(node, lambda n: n.meta[LAYOUT]), node.target  # the one propagation used
            if rule.localize is not None:
                args, kwargs = rule.localize(node, args, kwargs, node.meta[LAYOUT], rank)
            if rule.lower is not None:
                target, args, kwargs = rule.lower(node, args, kwargs, lambda n: _read_layout(n, node), rank, group_name)
            args = tuple(_on_device(a, device) for a in args)
            kwargs = {k: _on_device(v, device) for k, v in kwargs.items()}
            new = graph.call_function(device_ops.stand_in(target, device), args, kwargs)
        copy_origin(node, new)
        new.meta[LAYOUT] = node.meta.get(LAYOUT)
        env[node] = new
        if node.meta.get(REDUCE):
            env[node] = redistribute(node, Replicate(), have=Partial())
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(root, graph, class_name=f"Rank{rank}Of{world_size}")


def _check_in_place_updates(gm: fx.GraphModule) -> None:
    """An in-place op on state (a KV cache update) must write into the state as stored: a
    redistribution before it would make it write into a temporary copy. (Other in-place ops, on
    values the graph computed, may redistribute first where nothing else reads what they write:
    passes/sharding/propagate.py refuses the others.)"""
    for node in gm.graph.nodes:
        for written in written_inputs(node):
            if is_state(written) and written in node.meta.get(WANTS, {}):
                raise RewriteError(
                    f"{node.name} ({node.target}) updates {written.name} in place, but {written.name} is "
                    f"{written.meta[LAYOUT]} and the update needs it as {node.meta[WANTS][written]}: "
                    "store it in that layout (a manual plan that shards its producer differently can cause this)")

def _placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)


def _read_layout(n: fx.Node, user: fx.Node) -> Layout:
    """The layout in which `user` reads `n`: its want, if any, else n's own layout."""
    return user.meta.get(WANTS, {}).get(n, n.meta[LAYOUT])


def _splits(node: fx.Node) -> bool:
    """Whether `node`'s output, before any all_reduce right after it, is sharded or Partial: each rank's
    backward through it gives only a share of its replicated inputs' gradients."""
    layout = Partial() if node.meta.get(REDUCE) else node.meta.get(LAYOUT)
    layouts = layout if isinstance(layout, tuple) else (layout,)
    return any(isinstance(x, (Shard, Partial)) for x in layouts)


def _is_floating(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


def _emit_slice(graph: fx.Graph, x: fx.Node, shard: Shard, rank: int) -> fx.Node:
    if shard.outer == 1:  # one contiguous range on every rank, so all rank graphs keep one shape
        lo, hi = shard.owned_ranges(rank)[0]
        return graph.call_function(aten.slice.Tensor, (x, shard.dim, lo, hi))
    return graph.call_function(collectives.local_part, (x, *shard_args(shard), rank))
