"""Ops that keep channels apart: a depthwise convolution (each channel its own filter), the
selective scan of a Mamba layer (each channel its own recurrence) and the gated delta rule of a
linear-attention layer (each head its own recurrence). A shard of the channels passes
through them with the per-channel operands sliced alike; a shard of the batch passes too."""
from __future__ import annotations

import torch.fx as fx

from fxtp.sharding.layouts import Replicate, Shard, same_placement
from fxtp.sharding.op_rules.helpers import R, arg, is_tensor_node, replicate_all, shard_of, val
from fxtp.sharding.op_rules.rule import Decision, LayoutOf


def _per_channel(node: fx.Node, lay: LayoutOf, channel_inputs: dict, shared: list, what: str) -> Decision:
    """channel_inputs {input: its channel dim}, each input's channels being the output's dim 1;
    `shared` inputs hold no channels. The output follows a channel shard (or one of dim 0, the batch,
    where every input has one) of a channel input; replicated channel inputs are sliced to match."""
    channel_inputs = {n: d for n, d in channel_inputs.items() if is_tensor_node(n)}
    shared = [n for n in shared if is_tensor_node(n)]
    found = [(n, s) for n, s in ((n, shard_of(n, lay)) for n in channel_inputs) if s is not None]
    if not found:
        return replicate_all(node, lay, f"{what} of a Partial")
    n, s = found[0]
    if s.dim == channel_inputs[n]:
        out, want_of = s.with_dim(1), lambda m: s.with_dim(channel_inputs[m])
    elif s.dim == 0 and all(d > 0 for d in channel_inputs.values()):
        out, want_of = s, lambda m: s
    else:
        return replicate_all(node, lay, f"{what} with a dim sharded that is neither its channels nor its batch")
    wants = {}
    for m in channel_inputs:
        need, have = want_of(m), lay(m)
        if isinstance(have, Replicate):
            wants[m] = need
        elif not (isinstance(have, Shard) and same_placement(have, need)):
            return replicate_all(node, lay, f"{what} of inputs sharded differently")
    for m in shared:
        if out.dim == 0 and isinstance(lay(m), Replicate) and val(m).dim() > 0 and val(m).shape[0] == val(node).shape[0]:
            wants[m] = out
        elif not isinstance(lay(m), Replicate) and not (out.dim == 0 and same_placement(lay(m), out)):
            wants[m] = R
    return Decision(out, wants)


def depthwise_convolution(node: fx.Node, lay: LayoutOf) -> Decision:
    """conv1d/conv2d(x[batch, C, ...], W[C, 1, ...], b[C], groups=C) (Mamba's causal conv):
    channel-sharded x gives channel-sharded output, W and b sliced on dim 0; grouped or dense
    convolutions mix channels and run whole."""
    x, w, b = node.args[0], node.args[1], arg(node, 2, "bias")
    groups = arg(node, 6, "groups") or 1
    channels = val(x).shape[1]
    if all(isinstance(lay(n), Replicate) for n in (x, w, b) if is_tensor_node(n)):
        return Decision(R)
    if not (groups == channels == val(w).shape[0] and val(w).shape[1] == 1):
        return replicate_all(node, lay, f"convolution with {groups} groups of {channels} channels (not depthwise)")
    return _per_channel(node, lay, {x: 1, w: 0, b: 0}, [], "depthwise convolution")


def localize_groups(node, args, kwargs, out, rank):
    """A depthwise convolution of a rank's channels has as many groups as it has channels."""
    if not isinstance(out, Shard) or out.dim != 1:
        return args, kwargs
    if "groups" in kwargs:
        return args, {**kwargs, "groups": out.local_size(rank)}
    return (*args[:6], out.local_size(rank), *args[7:]), kwargs


def selective_scan(node: fx.Node, lay: LayoutOf) -> Decision:
    """fxtp::selective_scan(decay[b, C, L, N], increment[b, C, L, N], readout[b, L, N]) -> [b, C, L]
    (fxtp/rank_ops/selective_scan.py): every channel its own recurrence, read by the shared readout."""
    decay, increment, readout = node.args[:3]
    if all(isinstance(lay(n), Replicate) for n in (decay, increment, readout)):
        return Decision(R)
    return _per_channel(node, lay, {decay: 1, increment: 1}, [readout], "selective scan")


def chunk_gated_delta_rule(node: fx.Node, lay: LayoutOf) -> Decision:
    """fxtp::chunk_gated_delta_rule(query, key, value [b, H, L, d], g, beta [b, H, L]) -> [b, H, L, d_v]
    (fxtp/rank_ops/delta_rule.py): every head its own recurrence."""
    inputs = node.args[:5]
    if all(isinstance(lay(n), Replicate) for n in inputs):
        return Decision(R)
    return _per_channel(node, lay, {n: 1 for n in inputs}, [], "gated delta rule")
