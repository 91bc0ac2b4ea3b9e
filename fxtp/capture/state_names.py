"""Names of model state beyond the model's own: tensors a pass cuts out of another, and tied weights.

The checkpoint loader reads a derived tensor by its source's name, and a tied weight by any of its
names, so these names are part of the contract between capture and loading.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

_DERIVED = re.compile(r"^(?P<source>.+)\[(?P<lead>(?::, )*)(?P<start>\d+):(?P<end>\d+)\]$")


def derived_name(source: str, dim: int, start: int, end: int) -> str:
    """The state name of the block start:end of `source` along `dim`, in numpy indexing:
    "w[0:64]" on dim 0, "w[:, 0:64]" on dim 1 (HF names never end in "]").
    passes/capture/unfuse_projections.py names the weight pieces it cuts out this way.

    A block of a block along the same dim is named as one block of the stored tensor ("w[128:1280]"
    cut at 0:128 is "w[128:256]"): the checkpoint loader and `whole_state` read names one block deep.
    A block of a block along another dim would need two, and is refused."""
    parent = parse_derived(source)
    if parent is not None:
        root, parent_dim, parent_start, parent_end = parent
        if parent_dim != dim:
            raise ValueError(f"{source!r} is a block along dim {parent_dim}; a block of it along dim {dim} has no "
                             f"state name (a name holds one block of a stored tensor)")
        if not 0 <= start <= end <= parent_end - parent_start:
            raise ValueError(f"block {start}:{end} lies outside {source!r}, {parent_end - parent_start} long")
        return derived_name(root, dim, parent_start + start, parent_start + end)
    return f"{source}[{':, ' * dim}{start}:{end}]"


def parse_derived(name: str) -> Optional[tuple[str, int, int, int]]:
    """(source, dim, start, end) of a `derived_name`, None for a plain state name."""
    match = _DERIVED.match(name)
    if match is None:
        return None
    return match["source"], match["lead"].count(":"), int(match["start"]), int(match["end"])


def aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """{name: other names of the same tensor} for tied weights (lm_head.weight = embed_tokens.weight)."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: [n for n in names if n != name] for names in by_tensor.values() if len(names) > 1 for name in names}
