"""The gated delta rule for capture: transformers' `torch_chunk_gated_delta_rule` (qwen3_next,
qwen3_5, qwen3_5_moe, olmo_hybrid and others) with its loop over chunks in one op
(fxtp.rank_ops.delta_rule), which fxtp/capture/loop_free.py puts in its place during an export."""
from __future__ import annotations

from typing import Callable

import torch


# the parameters the replacement reads; a copy that lacks one computes something else and is kept
DELTA_RULE_PARAMETERS = ("query", "key", "value", "g", "beta", "chunk_size", "initial_state", "output_final_state",
                         "use_qk_l2norm_in_kernel")


def delta_rule_for(module: str) -> Callable:
    """A stand-in for `module`'s torch_chunk_gated_delta_rule (query, key [batch, seq, k_heads, k_dim],
    value [batch, seq, v_heads, v_dim], g, beta [batch, seq, v_heads]) that repeats the key heads over
    their value heads as it does, then calls the one op with heads on dim 1."""

    def delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
                   use_qk_l2norm_in_kernel=False, **_):
        if initial_state is not None or output_final_state:
            raise NotImplementedError("fxtp captures gated delta rule layers without a cache: no recurrent state "
                                      "is read or returned")
        repeats = value.shape[2] // key.shape[2]
        if repeats > 1:
            query, key = (x.repeat_interleave(repeats, dim=2) for x in (query, key))
        out = torch.ops.fxtp.chunk_gated_delta_rule(*(x.transpose(1, 2) for x in (query, key, value, g, beta)),
                                                    chunk_size, use_qk_l2norm_in_kernel, module)
        return out.transpose(1, 2), None

    return delta_rule
