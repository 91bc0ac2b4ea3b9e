"""Checks on what users pass to a sharded program; the first nodes of every rank graph."""
from __future__ import annotations

import torch


def checked_inputs(input_ids: torch.Tensor, attention_mask, device: torch.device,
                   names: tuple[str, str] = ("input_ids", "attention_mask"), fill: int = 1):
    """Validate token ids and a tensor of their shape (a mask, token types) on `device`, and
    return the latter as long (filled with `fill` when None). `names` are the two inputs' names."""
    ids_name, name = names
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
            or input_ids.dtype == torch.bool:
        what = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{ids_name} must be an integer tensor of shape [batch, seq] (token ids), got {what}")
    if input_ids.device != device:
        raise ValueError(f"{ids_name} are on {input_ids.device} but this rank's weights are on {device}: "
                         f"move the inputs with .to({str(device)!r})")
    if attention_mask is None:
        return torch.full_like(input_ids, fill)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        what = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"{name} must have the shape of {ids_name} {tuple(input_ids.shape)}, got {what}")
    if attention_mask.dtype.is_floating_point:
        holds = "0/1 integers or bools" if fill == 1 else "integers"
        raise ValueError(f"{name} must hold {holds}, got {attention_mask.dtype}")
    return attention_mask.to(torch.long)
