"""The checks a rank module on a real process group makes on every call: that every rank runs the same
program on the same inputs (fxtp/runtime/rank_agreement.py), with the same random generator state where
the graph draws random numbers (dropout while training), and that a rank that fails tells its peers
(fxtp/runtime/fail_fast.py)."""
from __future__ import annotations

import hashlib

import torch
import torch.fx as fx

from fxtp.runtime.fail_fast import failing_fast
from fxtp.runtime.rank_agreement import check_ranks_agree
from fxtp.sharding import collectives
from fxtp.sharding.op_rules.dropout import draws_random


def guard_rank_module(module: fx.GraphModule, group_name: str, rank: int) -> None:
    """Make each call of `module` (a rank graph on a real process group) check that the ranks agree on
    its inputs, and fail fast. Set on the module's own class (every GraphModule has one), so the module
    stays a GraphModule; a later recompile() drops it."""
    step = type(module).forward
    names = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    # every rank graph of one program has the same nodes in the same order (one rewrite makes them all);
    # a rank running another program (another config, another world size) would pair collectives wrongly
    program = hashlib.sha1(" ".join(n.name for n in module.graph.nodes).encode()).hexdigest()[:16]
    # dropout in a training graph must draw alike on every rank (fxtp/sharding/op_rules/dropout.py)
    draws = any(draws_random(n) for n in module.graph.nodes)

    def forward(self, *args, **kwargs):
        with failing_fast(group_name, rank):
            values = {"program (its nodes in order)": program, **dict(zip(names, args)), **kwargs}
            if draws:
                values["random generator state (seed every rank alike)"] = generator_state(self)
            check_ranks_agree(collectives.process_group_named(group_name), "inputs to the rank modules", values)
            return step(self, *args, **kwargs)

    type(module).forward = forward


def generator_state(module: torch.nn.Module) -> torch.Tensor:
    """The state of the random generator that `module`'s random ops draw from (its device's)."""
    device = next((t.device for t in module.parameters()), torch.device("cpu"))
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.random.get_rng_state()
