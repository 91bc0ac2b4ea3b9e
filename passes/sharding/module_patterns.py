"""Module-name patterns of manual plans: which modules a pattern matches, and the patterns closest to one
that matches none.

Patterns match full module names ("model.layers.0.self_attn.q_proj") with fnmatch, where `*` also
matches dots: "*.q_proj" is every layer's q_proj, "self_attn.q_proj" is no module at all.
"""
from __future__ import annotations

import difflib
from fnmatch import fnmatchcase
from typing import Iterable

import torch.fx as fx

from fxtp.node_meta import STATE


def module_names(gm: fx.GraphModule) -> set[str]:
    """Every module that holds state of the captured model, and the modules around them. A graph
    holds all of the model's state, used or not (an encoder's graph names the decoder's weights
    too), so any graph of a model gives the same names."""
    names = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and STATE in node.meta:
            parts = node.meta[STATE].split(".")[:-1]
            names.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return names


def matches_any(pattern: str, names: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for name in names)


def closest(wanted: str, names: Iterable[str], tail_prefix: str = "*.", count: int = 3) -> list[str]:
    """Up to `count` patterns like `wanted` that do match some of `names`: the names with their layer
    numbers as `*`, and their dotted tails after `tail_prefix` ("*.self_attn.q_proj", "*.q_proj")."""
    candidates = set()
    for name in names:
        parts = ["*" if part.isdigit() else part for part in name.split(".")]
        candidates.add(".".join(parts))
        candidates.update(tail_prefix + ".".join(parts[k:]) for k in range(1, len(parts)) if parts[k] != "*")
    return difflib.get_close_matches(wanted, sorted(candidates), n=count)


def example(pattern: str, names: Iterable[str]) -> str:
    """The first of `names` (in sorted order) that `pattern` matches, or "" where none does."""
    return next((name for name in sorted(names) if fnmatchcase(name, pattern)), "")
