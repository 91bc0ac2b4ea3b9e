"""Run every rank's graph in one process, in lockstep, with collectives computed exactly.

All rank graphs come from one rewrite, so they have the same nodes in the same order; only
shapes and constants differ. The simulator walks them together: ordinary nodes run per rank,
a collective node combines the values of all ranks (sum in rank order, or reassembly).
"""
from __future__ import annotations

import operator

import torch.fx as fx

from fxtp.sharding import collectives


def simulate(modules: list[fx.GraphModule], args: tuple, kwargs: dict) -> list:
    """Outputs of every rank for the same inputs."""
    envs: list[dict[fx.Node, object]] = [{} for _ in modules]
    graphs = [list(m.graph.nodes) for m in modules]
    if len({len(g) for g in graphs}) != 1:
        raise RuntimeError("rank graphs differ in structure; cannot simulate them in lockstep")
    outputs = []
    for nodes in zip(*graphs):
        head = nodes[0]
        load = [lambda a, env=env: fx.map_arg(a, lambda n: env[n]) for env in envs]
        if head.op == "placeholder":
            value = _placeholder_value(head, args, kwargs, graphs[0])
            for env, node in zip(envs, nodes):
                env[node] = value
        elif head.op == "get_attr":
            for env, node, module in zip(envs, nodes, modules):
                env[node] = operator.attrgetter(node.target)(module)
        elif head.op == "output":
            outputs = [fx.map_arg(node.args[0], lambda n, env=env: env[n]) for env, node in zip(envs, nodes)]
        elif head.target is collectives.ALL_REDUCE:
            parts = [env[node.args[0]] for env, node in zip(envs, nodes)]
            total = parts[0].clone()
            for p in parts[1:]:
                total = total + p
            for env, node in zip(envs, nodes):
                env[node] = total.clone()
        elif head.target is collectives.all_gather_shard:
            parts = [env[node.args[0]] for env, node in zip(envs, nodes)]
            full = collectives.assemble(parts, *head.args[1:5])
            for env, node in zip(envs, nodes):
                env[node] = full.clone()
        else:
            for env, node, ld in zip(envs, nodes, load):
                env[node] = node.target(*ld(node.args), **ld(node.kwargs))
    return outputs


def _placeholder_value(node: fx.Node, args: tuple, kwargs: dict, nodes: list[fx.Node]):
    position = [n for n in nodes if n.op == "placeholder"].index(node)
    if position < len(args):
        return args[position]
    if node.name in kwargs:
        return kwargs[node.name]
    if node.args:
        return node.args[0]  # default value
    raise TypeError(f"missing input {node.name!r}")
