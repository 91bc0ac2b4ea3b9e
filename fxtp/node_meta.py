"""The node.meta keys fxtp writes, each defined once, and the one way fxtp copies a node's origin
(and makes a node of an op in place of another: `replay`).

A pass that reads or writes one of these imports the name from here; its docstring still says
which keys it reads and writes (by their string, as torch.fx's own passes do).
"""
from __future__ import annotations

import torch.fx as fx

__all__ = ["STATE", "TOKENS", "LAYOUT", "WANTS", "NOTE", "REDUCE", "COLLECTIVE", "REALIZE", "ORIGIN", "copy_origin", "replay"]

# The model state a placeholder holds: its HF name ("model.layers.0.mlp.up_proj.weight"). Written by
# fxtp.capture.export.flatten on every parameter, buffer and lifted constant, and by
# passes/capture/unfuse_projections.py on the blocks it cuts from a fused weight.
STATE = "fxtp.state"

# On a user-input placeholder: True where it holds token ids, so that the embedding tables it indexes are
# tried as vocab-parallel (passes/sharding/plan.py). Written by fxtp.capture.export.flatten on a HF model's
# token-id inputs (fxtp.capture.signatures.TOKEN_IDS) and on a plain module's 2-D integer inputs
# (fxtp/capture/plain_module.py); position and token-type ids of a HF model are not marked.
TOKENS = "fxtp.tokens"

# The node's Layout (a tuple of them for a multi-output op, None for a non-tensor), over all ranks.
# Written by passes/sharding/propagate.py on the global graph; passes/codegen/rewrite.py copies it onto
# every node of a rank graph (and gives the collectives it adds the layout they produce).
LAYOUT = "fxtp.layout"

# {input node: Layout} for the inputs that must be redistributed before the node runs (only those whose
# layout differs). Written by passes/sharding/propagate.py; read by the rewrite, which inserts the moves.
WANTS = "fxtp.wants"

# Why the node forced its inputs to Replicate ("" where it did not), for the dump. Written by
# passes/sharding/propagate.py from the op rule's Decision.
NOTE = "fxtp.note"

# True where the node's Partial output is all-reduced right after it, once for all its users (its
# LAYOUT is then Replicate). Written by passes/sharding/propagate.py.
REDUCE = "fxtp.reduce"

# On a collective of a rank graph: the name of the global node whose value it moves. Written by
# passes/codegen/rewrite.py; tests and the dump match collectives to the values they reduce.
COLLECTIVE = "fxtp.collective"

# Inductor's own key: True asks Inductor to store the node's value (not recompute it inside each
# reader). Written by passes/decode/store_gemv_inputs.py on the inputs of fxtp's GEMV kernels.
REALIZE = "inductor_realize_to_strides"

# torch's keys that say where a node comes from: the module that ran it and the source line. The dump
# and fxtp.stats group nodes by module through them, so a node a pass makes in place of another keeps them.
ORIGIN = ("nn_module_stack", "stack_trace", "source_fn_stack")


def copy_origin(source: fx.Node, target: fx.Node, value: bool = False) -> None:
    """Give `target` the ORIGIN keys `source` has; with `value`, also its meta["val"] (the fake tensor),
    for a node that computes the same value as `source` (not one of a rank graph: its shapes are local)."""
    for key in ORIGIN + (("val",) if value else ()):
        if key in source.meta:
            target.meta[key] = source.meta[key]


def replay(graph: fx.Graph, fake_mode, origin: fx.Node, target, args: tuple, kwargs: dict) -> fx.Node:
    """A node calling `target` at the graph's insertion point, with `origin`'s ORIGIN keys and its value
    (meta["val"]) computed from its inputs' under `fake_mode` (torch._guards.detect_fake_mode): a node
    that a capture clean-up makes in place of `origin`, or of a part of it."""
    new = graph.call_function(target, args, kwargs)
    copy_origin(origin, new)
    fake_args, fake_kwargs = fx.map_arg((args, kwargs), lambda n: n.meta["val"])
    with fake_mode:
        new.meta["val"] = target(*fake_args, **fake_kwargs)
    return new
