"""The recurrence of a Mamba (selective state space) layer as one op, so that a graph keeps the
sequence length dynamic.

transformers runs it as a Python loop over the sequence when exporting, which torch.export unrolls
for the example length: the graph then fits that length only. As one op the loop runs at call
time. Each channel (dim 1) is its own recurrence, which is what lets the sharding rule split the
channels over ranks (fxtp/sharding/op_rules/channels.py).
"""
from __future__ import annotations

import torch


@torch.library.custom_op("fxtp::selective_scan", mutates_args=())
def selective_scan(decay: torch.Tensor, increment: torch.Tensor, readout: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """decay, increment [batch, channels, seq, state], readout [batch, seq, state] -> y [batch,
    channels, seq] in `dtype`: h_t = decay_t * h_(t-1) + increment_t from h_(-1) = 0, and
    y_t = h_t @ readout_t with h_t cast to `dtype`; the same operations in the same order as
    transformers' loop (modeling_mamba.mamba_selective_scan), so the results are bitwise equal."""
    batch, channels, length, state = decay.shape
    h = torch.zeros(batch, channels, state, dtype=dtype, device=decay.device)
    outputs = []
    for t in range(length):
        h = decay[:, :, t] * h + increment[:, :, t]
        outputs.append(torch.matmul(h.to(dtype), readout[:, t, :].unsqueeze(-1))[:, :, 0])
    return torch.stack(outputs, dim=-1) if outputs else decay.new_zeros(batch, channels, 0, dtype=dtype)


@selective_scan.register_fake
def _(decay, increment, readout, dtype):
    return decay.new_empty(decay.shape[:3], dtype=dtype)
