"""The decode step's stand-in for transformers' `grouped_mm_fallback`, which a CUDA graph cannot
capture.

transformers runs an MoE layer's expert matmuls as one grouped matmul: aten._grouped_mm in
bfloat16, and in other dtypes under torch.export or torch.compile its own custom op
`transformers::grouped_mm_fallback`, which reads the groups' offsets on the host (`offs.tolist()`).
That sync is fine eagerly and in the prefill, but a CUDA graph capture refuses it, so the compiled
decode step (fxtp/decode/decode_graph.py) calls `grouped_mm_by_rows` in its place: the same product with
every shape static and no host sync. Each row's expert is found on the device, and its weight is
read either by row (at most as many rows as experts: each row reads only its own expert's weight,
as a decode step at batch 1 reads 2 of Mixtral's 8) or by expert (more rows: every expert's weight
is read once for all rows, and each row keeps its own expert's product).
"""
from __future__ import annotations

import torch



def grouped_mm_by_rows(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`grouped_mm_fallback(input[S, in], weight[E, in, out], offs[E])`: row r times the weight of
    expert e where offs[e-1] <= r < offs[e]; rows from offs[-1] on are zero, as there."""
    rows, experts = input.shape[0], weight.shape[0]
    expert = torch.searchsorted(offs, torch.arange(rows, device=input.device, dtype=offs.dtype), right=True)
    routed = (expert < experts).unsqueeze(-1)
    expert = expert.clamp(max=experts - 1)
    if rows <= experts:  # in float32, as matmuls accumulate: one rounding to input's dtype at the end
        product = (input.unsqueeze(-1).float() * weight[expert].float()).sum(1)
    else:
        product = torch.matmul(input, weight)[expert, torch.arange(rows, device=input.device)]
    return torch.where(routed, product, 0).to(input.dtype)


