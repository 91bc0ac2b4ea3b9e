"""Mamba's recurrence for capture: transformers' `mamba_selective_scan` (mamba, falcon_mamba, jamba,
zamba) with its loop over the sequence in one op (fxtp.rank_ops.selective_scan), which
fxtp/capture/loop_free.py puts in its place during an export."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fxtp.rank_ops.selective_scan  # noqa: F401  (registers torch.ops.fxtp.selective_scan)

SCAN_FUNCTION = "mamba_selective_scan"
# the parameters the replacement reads; a copy that lacks one computes something else and is kept
SCAN_PARAMETERS = ("hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state")


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **_):
    """transformers' mamba_selective_scan (x, dt [batch, channels, seq], A [channels, state],
    B, C [batch, state, seq]) with its sequential path's operations, the loop in one op."""
    if return_last_state:
        raise NotImplementedError("fxtp captures Mamba layers without a cache: no recurrent state is returned")
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    decay = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    increment = dt[:, :, :, None] * B[:, None, :, :].float() * hidden_states[:, :, :, None].float()
    out = torch.ops.fxtp.selective_scan(decay, increment, C, input_dtype)
    if D is not None:
        out = out + hidden_states * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    return out
