"""A row-parallel projection and the push all_reduce after it as a GEMV that pushes its outputs itself
(`DecodeOptions.gemv_push`, fxtp/decode/options.py, off by default; passes/decode/fuse_gemv_push.py puts
these ops in a decode step).

At batch 1 a Llama layer's o and down projections each end in an all_reduce. With push all_reduce
(fxtp/kernels/push_all_reduce.py) that is a GEMV that stores its outputs, then the push kernel, which loads
them, writes them into every peer's buffer and polls its own until the peers' parts have landed.
Here fxtp's GEMV (fxtp/kernels/gemv.py, its push epilogue) writes each output it sums into the peers'
buffers as well as into its own output, so most of a rank's part has landed at its peers while the
GEMV's last programs still run; the push kernel after it only polls, sums and, in the norm form,
adds the residual and normalizes (`pushed=True`). The buffers, rounds and empty slots are push
all_reduce's: the GEMV reads the round after its PDL wait, once the push kernel before it has moved
the round on, and writes a round's buffer only after this rank has read the peers' parts of the
round before, as the push kernel does. The sums are the bits of the GEMV and then push all_reduce.

It is opt-in: on H100 the step ran slower with it than with inductor's GEMVs and then push, and no
faster than with fxtp's GEMV and then push (benchmarks/results/decode_step_history.md).

Elsewhere (more than one row, CPU tensors, parts over push's MAX_BYTES, anything the GEMV kernel
does not take) the ops are fxtp::gemv and then the push all_reduce op, which falls back as it does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fxtp.kernels import gemv, push_all_reduce as push
from fxtp.kernels.gemv import holds_one_row


def _pushes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the GEMV kernel runs this projection and push all_reduce's kernel sums its output."""
    return x.device.type == "cuda" and gemv.kernel_applies(x, weight, bias) and push.takes(x.dtype, weight.size(0))


def _pushed_part(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], prefetch_bytes: int,
                 group_name: str) -> tuple[torch.Tensor, push.Peers]:
    """This rank's part, computed by the GEMV and already written to the peers' buffers, and their Peers."""
    peers = push.peers_of(group_name, x.dtype, weight.size(0), x.device)
    return gemv.launch(x, weight, bias, prefetch_bytes=prefetch_bytes, push=peers), peers


@torch.library.custom_op("fxtp::gemv_push_all_reduce", mutates_args=())
def gemv_push_all_reduce(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], prefetch_bytes: int,
                         group_name: str) -> torch.Tensor:
    """`push_all_reduce(gemv(x, weight, bias, prefetch_bytes), group_name)`, the GEMV pushing its outputs."""
    if not _pushes(x, weight, bias):
        return torch.ops.fxtp.push_all_reduce(torch.ops.fxtp.gemv(x, weight, bias, prefetch_bytes), group_name)
    part, peers = _pushed_part(x, weight, bias, prefetch_bytes, group_name)
    return push.launch(part, *peers, pushed=True)


@gemv_push_all_reduce.register_fake
def _(x, weight, bias, prefetch_bytes, group_name):
    return x.new_empty(x.shape[:-1] + weight.shape[:1])


@torch.library.custom_op("fxtp::gemv_push_all_reduce_add_rms_norm", mutates_args=())
def gemv_push_all_reduce_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                      prefetch_bytes: int, residual: torch.Tensor, norm_weight: torch.Tensor,
                                      eps: float, normalized_dtype: Optional[torch.dtype], group_name: str
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`push_all_reduce_add_rms_norm(gemv(x, weight, bias, prefetch_bytes), residual, norm_weight, eps,
    normalized_dtype, group_name)`, the GEMV pushing its outputs."""
    part_like = torch.empty(x.shape[:-1] + weight.shape[:1], dtype=x.dtype, device="meta")
    if not (_pushes(x, weight, bias) and push.fits_norm_epilogue(part_like, residual, norm_weight, normalized_dtype)):
        return torch.ops.fxtp.push_all_reduce_add_rms_norm(torch.ops.fxtp.gemv(x, weight, bias, prefetch_bytes),
                                                           residual, norm_weight, eps, normalized_dtype, group_name)
    part, peers = _pushed_part(x, weight, bias, prefetch_bytes, group_name)
    return push.launch_add_rms_norm(part, residual.contiguous(), norm_weight.contiguous(), eps, *peers, pushed=True)


@gemv_push_all_reduce_add_rms_norm.register_fake
def _(x, weight, bias, prefetch_bytes, residual, norm_weight, eps, normalized_dtype, group_name):
    part = x.new_empty(x.shape[:-1] + weight.shape[:1])
    return push.add_rms_norm(part, residual, norm_weight, eps, normalized_dtype)


def projection_all_reduce(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], prefetch_bytes: int,
                          group_name: str) -> torch.Tensor:
    """passes/decode/fuse_gemv_push.py's node for a projection and its push all_reduce: the fused op where x
    holds one row, else the two. torch.compile traces this with static shapes, so a step of several
    rows keeps what inductor makes of the projection."""
    if holds_one_row(x):
        return torch.ops.fxtp.gemv_push_all_reduce(x, weight, bias, prefetch_bytes, group_name)
    return torch.ops.fxtp.push_all_reduce(F.linear(x, weight, bias), group_name)


def projection_all_reduce_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                       prefetch_bytes: int, residual: torch.Tensor, norm_weight: torch.Tensor,
                                       eps: float, normalized_dtype: Optional[torch.dtype], group_name: str) -> tuple:
    """`projection_all_reduce` with the norm epilogue (passes/decode/fuse_add_rms_norm.py's op)."""
    if holds_one_row(x):
        return torch.ops.fxtp.gemv_push_all_reduce_add_rms_norm(x, weight, bias, prefetch_bytes, residual, norm_weight,
                                                                eps, normalized_dtype, group_name)
    return torch.ops.fxtp.push_all_reduce_add_rms_norm(F.linear(x, weight, bias), residual, norm_weight, eps,
                                                       normalized_dtype, group_name)
