"""What a layout rule returns (`Decision`) and what the table holds for an op (`OpRule`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.fx as fx

from fxtp.sharding.layouts import Layout

LayoutOf = Callable[[fx.Node], Optional[Layout]]


@dataclass
class Decision:
    out: object  # a Layout, a tuple of them (multi-output ops), or None (no tensor output)
    wants: dict[fx.Node, Layout] = field(default_factory=dict)
    note: str = ""  # why inputs were replicated, for the dump
    reduce_now: bool = False  # all_reduce a Partial output right after the node, for all its users


@dataclass(frozen=True)
class OpRule:
    propagate: Callable[[fx.Node, LayoutOf], Decision]
    # (node, args, kwargs, out_layout, rank) -> (args, kwargs) with per-rank constants
    localize: Optional[Callable] = None
    # (node, args, kwargs, input_layout, rank, group_name) -> (target, args, kwargs) where a rank computes
    # the node with another function (input_layout(n): the layout in which the node reads input n;
    # group_name: the process group of the rank's collectives, for a function that runs some itself)
    lower: Optional[Callable] = None
