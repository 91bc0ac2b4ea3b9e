"""Checks on what users pass to a sharded program; the first node of every rank graph."""
from __future__ import annotations

import torch


def checked_inputs(input_ids: torch.Tensor, attention_mask, device: torch.device):
    """Validate (input_ids, attention_mask) on `device` and return the mask (all ones when None)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
            or input_ids.dtype == torch.bool:
        what = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq] (token ids), got {what}")
    if input_ids.device != device:
        raise ValueError(f"input_ids are on {input_ids.device} but this rank's weights are on {device}: "
                         f"move the inputs with .to({str(device)!r})")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        what = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {what}")
    if attention_mask.dtype.is_floating_point:
        raise ValueError(f"attention_mask must hold 0/1 integers or bools, got {attention_mask.dtype}")
    return attention_mask.to(torch.long)
