"""The clean-ups every captured graph gets before it is planned, in order.

Reads:  a `Captured` straight from fxtp.capture (node.meta["val"], node.meta["fxtp.state"]).
Writes: its graph in place: context wrappers inlined (inline_wrappers), identities dropped
        (remove_identities), biases split from their GEMMs (split_bias), buffers filled slice by slice
        made the cat of their fills (fills_as_cat), standard deviations and variances made the mean and
        sum of squares they are (spread_as_sums), then projections cut into
        unequal pieces unfused into one per piece over derived state (unfuse_projections, which adds
        those pieces to `captured.state`), then chains through a depthwise conv cut after it split per
        piece (split_channel_chains) and the projections those pieces start at unfused. Each step leaves a graph it has already cleaned as it is,
        so cleaning twice is cleaning once.
"""
from __future__ import annotations

from fxtp.capture.export import Captured
from fxtp.passes.capture.fills_as_cat import fills_as_cat
from fxtp.passes.capture.inline_wrappers import inline_wrappers
from fxtp.passes.capture.remove_identities import remove_identities
from fxtp.passes.capture.split_bias import split_bias
from fxtp.passes.capture.split_channel_chains import split_channel_chains
from fxtp.passes.capture.spread_as_sums import spread_as_sums
from fxtp.passes.capture.unfuse_projections import unfuse_projections


def clean_up(captured: Captured) -> Captured:
    gm = captured.graph_module
    spread_as_sums(fills_as_cat(split_bias(remove_identities(inline_wrappers(gm)))))
    unfuse_projections(gm, captured.state)
    unfuse_projections(split_channel_chains(gm, captured.state), captured.state)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return captured
