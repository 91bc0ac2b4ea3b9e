"""Where a rank graph's state tensors come from: the capture's tensors, a checkpoint, or the model itself.

A rank graph asks for each state tensor by its name and layout (passes/codegen/rewrite.py's `load`);
the answer is this rank's part on the rank's device, owned by the rank (never the model's own
memory), and shared by all graphs of the rank (`shared`), so that a step program of another cache
size reuses the weights already placed. A KV cache is zeros of the rank's size.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fxtp.capture.state_names import parse_derived
from fxtp.capture.static_cache import is_cache_state
from fxtp.passes.codegen.rewrite import own_state, slice_state
from fxtp.runtime.checkpoint import RankLoader, read_part
from fxtp.sharding.layouts import Layout

Loader = Callable[[str, Layout], torch.Tensor]


def state_loader(state: dict[str, torch.Tensor], rank: int, device: torch.device, *, model: torch.nn.Module,
                 aliases: dict[str, list[str]], constants: frozenset = frozenset(), checkpoint: Optional[str] = None,
                 shared: Optional[dict] = None, from_model: bool = False, training: bool = False) -> Loader:
    """`load(name, layout)` for a rank graph of a capture with `state` (real tensors, or meta ones
    where the model is on meta). With `checkpoint` the parts are read from that HF safetensors
    checkpoint (export's lifted `constants` from `state`, which holds their values); with
    `from_model` from the model's own tensors of those names (`state` then describes them only: a
    rank graph read back from fxtp/runtime/step_cache.py); else from `state`. `shared` maps (name,
    str(layout)) to what the rank holds already. With `training` a floating parameter's part
    requires grad: the rank trains it where it is."""
    loader = RankLoader(checkpoint, rank, state, aliases, model, device) if checkpoint is not None else None
    tensors = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]) \
        if from_model and loader is None else {}
    shared = {} if shared is None else shared

    def read(name: str, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank's part, and the full tensor it may share memory with."""
        if loader is not None and name not in constants:
            return loader(name, layout), state[name]
        if tensors:
            derived = parse_derived(name)  # a block of a stored tensor
            source, block = (derived[0], derived[1:]) if derived is not None else (name, None)
            return read_part(tensors[source], block, layout, rank), tensors[source]
        return slice_state(state[name], layout, rank), state[name]

    def load(name: str, layout: Layout) -> torch.Tensor:
        if is_cache_state(name):  # a KV cache starts as zeros, allocated at its local size
            return torch.zeros(slice_state(state[name], layout, rank).shape, dtype=state[name].dtype, device=device)
        key = (name, str(layout))
        if key not in shared:
            part, whole = read(name, layout)
            # every graph of the rank holds this object, so a compiled step that merges projections
            # (passes/decode/merge_projections.py) re-points it for all of them
            shared[key] = own_state(owned_copy(part.to(device).contiguous(), whole), state[name])
            if training and isinstance(shared[key], torch.nn.Parameter) and shared[key].is_floating_point():
                shared[key].requires_grad_(True)
        return shared[key]

    return load


def readable_from_model(model: torch.nn.Module, names) -> bool:
    """Whether every state name in `names` is a KV cache or a tensor of `model` (or a block of one)."""
    own = {name for name, _ in [*model.named_parameters(remove_duplicate=False),
                                *model.named_buffers(remove_duplicate=False)]}
    return all(is_cache_state(name) or (parse_derived(name) or (name,))[0] in own for name in names)


def owned_copy(part: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
    """`part` (a rank's slice of the model's tensor `entry`), copied where it still shares the model's memory.
    A program owns its weights: changing the model after fxtp.compile (an in-place update, a fine-tune
    step) never reaches a rank graph made before, whatever the slice's layout. Compile again to see it."""
    if part.device == entry.device and entry.device.type != "meta" and \
            part.untyped_storage().data_ptr() == entry.untyped_storage().data_ptr():
        return part.clone()
    return part
