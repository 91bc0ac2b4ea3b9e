"""Checks on what users pass to a sharded program; the first nodes of every rank graph."""
from __future__ import annotations

import torch


TOKEN_ID_DTYPES = (torch.int64, torch.int32)  # what an embedding lookup takes, as in HF


def require_tensor(name: str, value) -> None:
    """A TypeError naming `name` unless `value` is a tensor (the usual slip: a Python list of ids)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids [batch, seq], got {type(value).__name__}: "
                        f"wrap it, e.g. torch.tensor({name})")


def exact_device(device) -> torch.device:
    """`device` with its index: a bare 'cuda' means the current CUDA device, where `.to('cuda')` puts a
    tensor and what that tensor's `.device` then names, so that the two compare equal."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        return torch.device(device.type, getattr(torch, device.type).current_device())
    return device


def checked_inputs(input_ids: torch.Tensor, attention_mask, device: torch.device,
                   names: tuple[str, str] = ("input_ids", "attention_mask"), fill: int = 1):
    """Validate token ids and a tensor of their shape (a mask, token types) on `device`, and
    return the latter as long (filled with `fill` when None). `names` are the two inputs' names."""
    ids_name, name = names
    require_tensor(ids_name, input_ids)
    if input_ids.dim() != 2 or input_ids.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"{ids_name} must be an integer tensor (int64 or int32) of shape [batch, seq] (token ids), got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}: convert with .long()")
    if input_ids.numel() == 0:
        raise ValueError(f"{ids_name} is empty (shape {tuple(input_ids.shape)}): pass at least one sequence of at "
                         "least one token")
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
