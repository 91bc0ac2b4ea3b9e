"""Run every rank's graph in one process, in lockstep, with collectives computed exactly.

All rank graphs come from one rewrite, so they have the same collectives in the same order; shapes
and constants differ, and so may the nodes between two collectives (a rank skips what another
computes alone). The simulator runs each rank up to its next collective, then the collective
combines the values of all ranks (sum in rank order, or reassembly).

Rank graphs that train (fxtp/sharding/training_collectives.py) run here with autograd as they
would on their own processes: rank r's output of a sum or a gather depends on its own input only
(the others' are detached), and reduce_gradient sums the ranks' gradients. Backward of every
rank's loss together then gives each rank the gradients its own process would get. An op that
draws random numbers draws them from the same generator state on every rank, as ranks seeded
alike do.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxtp.sharding import collectives, training_collectives
from fxtp.sharding.op_rules.cross_entropy import vocab_parallel_cross_entropy
from fxtp.sharding.op_rules.dropout import draws_random

aten = torch.ops.aten


def simulate(modules: list[fx.GraphModule], args: tuple, kwargs: dict) -> list:
    """Outputs of every rank for the same inputs."""
    envs: list[dict[fx.Node, object]] = [{} for _ in modules]
    graphs = [list(m.graph.nodes) for m in modules]
    at = [0] * len(graphs)
    while True:
        for env, nodes, module, r in zip(envs, graphs, modules, range(len(graphs))):
            while not _joint(nodes[at[r]]):  # a rank's own nodes up to its next collective
                _run_own(nodes[at[r]], env, module, args, kwargs, nodes)
                at[r] += 1
        nodes = [g[i] for g, i in zip(graphs, at)]
        head = nodes[0]
        if any(n.op != head.op or n.target != head.target for n in nodes):
            raise RuntimeError(f"rank graphs differ in structure: their next collectives are "
                               f"{[n.format_node() for n in nodes]}; cannot simulate them in lockstep")
        if head.op == "output":
            return [fx.map_arg(node.args[0], lambda n, env=env: env[n]) for env, node in zip(envs, nodes)]
        _run_joint(head, nodes, envs)
        at = [i + 1 for i in at]


def _joint(node: fx.Node) -> bool:
    """Whether every rank runs `node` together: a collective, an op drawing random numbers (drawn alike
    on every rank), the output. Other nodes a rank runs alone (some a rank has alone: an iteration over
    heads only it owns, fxtp/sharding/op_rules/on_rank.py)."""
    return node.op == "output" or node.op == "call_function" and (node.target in _COLLECTIVES or draws_random(node))


def _run_own(node: fx.Node, env: dict, module: fx.GraphModule, args: tuple, kwargs: dict, nodes: list) -> None:
    if node.op == "placeholder":
        env[node] = _placeholder_value(node, args, kwargs, nodes)
    elif node.op == "get_attr":
        env[node] = operator.attrgetter(node.target)(module)
    else:
        env[node] = node.target(*_loaded(node.args, env), **_loaded(node.kwargs, env))


def _loaded(a, env: dict):
    """`a` (a node's args or kwargs) with its nodes replaced by their values in `env`."""
    return fx.map_arg(a, lambda n: env[n])


def _run_joint(head: fx.Node, nodes: list[fx.Node], envs: list[dict]) -> None:
    """A collective (or a random op) of every rank at once: `nodes`, one per rank, are its calls."""
    if head.target is collectives.ALL_REDUCE:
        total = _sum([env[node.args[0]] for env, node in zip(envs, nodes)])
        for env, node in zip(envs, nodes):
            env[node] = total.clone()
    elif head.target is collectives.all_gather_shard:
        parts = [env[node.args[0]] for env, node in zip(envs, nodes)]
        full = collectives.assemble(parts, *head.args[1:5])
        for env, node in zip(envs, nodes):
            env[node] = full.clone()
    elif head.target is training_collectives.reduce_partial:
        parts = [env[node.args[0]] for env, node in zip(envs, nodes)]
        for rank, (env, node) in enumerate(zip(envs, nodes)):
            env[node] = _sum(_own(parts, rank))
    elif head.target is training_collectives.gather_shard:
        parts = [env[node.args[0]] for env, node in zip(envs, nodes)]
        for rank, (env, node) in enumerate(zip(envs, nodes)):
            env[node] = collectives.assemble(_own(parts, rank), *head.args[1:5])
    elif head.target is training_collectives.reduce_gradient:
        values = _SumOfGradients.apply(*[env[node.args[0]] for env, node in zip(envs, nodes)])
        for env, node, value in zip(envs, nodes, values):
            env[node] = value
    elif head.target is vocab_parallel_cross_entropy:
        parts = [env[node.args[0]] for env, node in zip(envs, nodes)]
        target, reduction, ignore_index = (envs[0][head.args[1]], *head.args[2:4])
        for rank, (env, node) in enumerate(zip(envs, nodes)):
            logits = torch.cat(_own(parts, rank), dim=1)
            env[node] = aten.cross_entropy_loss.default(logits, target, None, reduction, ignore_index)
    else:  # draws random numbers
        generator_state = torch.random.get_rng_state(), _cuda_states()
        for env, node in zip(envs, nodes):
            torch.random.set_rng_state(generator_state[0])
            if generator_state[1] is not None:
                torch.cuda.set_rng_state_all(generator_state[1])
            env[node] = node.target(*_loaded(node.args, env), **_loaded(node.kwargs, env))


_COLLECTIVES = (collectives.ALL_REDUCE, collectives.all_gather_shard, training_collectives.reduce_partial,
                training_collectives.gather_shard, training_collectives.reduce_gradient, vocab_parallel_cross_entropy)


def _sum(values: list):
    """The sum of `values` in rank order, as a new tensor: the order an all_reduce is simulated in."""
    total = values[0] + values[1] if len(values) > 1 else values[0].clone()
    for value in values[2:]:
        total = total + value
    return total


def _own(parts: list, rank: int) -> list:
    """`parts` with every rank's value but `rank`'s detached: what rank's own process differentiates."""
    return [p if r == rank or not isinstance(p, torch.Tensor) else p.detach() for r, p in enumerate(parts)]


def _cuda_states():
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


class _SumOfGradients(torch.autograd.Function):
    """reduce_gradient of every rank at once: identities whose backward is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, *values):
        return tuple(v.view_as(v) for v in values)

    @staticmethod
    def backward(ctx, *grads):
        total = _sum([g for g in grads if g is not None])
        return tuple(total for _ in grads)


def _placeholder_value(node: fx.Node, args: tuple, kwargs: dict, nodes: list[fx.Node]):
    position = [n for n in nodes if n.op == "placeholder"].index(node)
    if position < len(args):
        return args[position]
    if node.name in kwargs:
        return kwargs[node.name]
    if node.args:
        return node.args[0]  # default value
    raise TypeError(f"missing input {node.name!r}")
