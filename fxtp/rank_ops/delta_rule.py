"""The gated delta rule of a linear-attention layer (Qwen3-Next, Qwen3.5, OLMo-Hybrid) as one op, so
that a graph keeps the sequence length dynamic.

transformers' reference `torch_chunk_gated_delta_rule` loops over chunks of the sequence in Python,
a loop torch.export unrolls for the example length: the graph then computes as many chunks as the
example had, and a longer input gets a wrong output. As one op, the loop runs at call time. Each
value head is its own recurrence, which is what lets the sharding rule split the heads over ranks
(fxtp/sharding/op_rules/channels.py); the op takes and gives heads on dim 1 for that rule.
"""
from __future__ import annotations

import importlib

import torch

FUNCTION = "torch_chunk_gated_delta_rule"


@torch.library.custom_op("fxtp::chunk_gated_delta_rule", mutates_args=())
def chunk_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, chunk_size: int, use_qk_l2norm: bool, module: str) -> torch.Tensor:
    """query, key [batch, heads, seq, k_dim], value [batch, heads, seq, v_dim], g, beta [batch, heads,
    seq] -> [batch, heads, seq, v_dim] in query's dtype: `module`'s own torch_chunk_gated_delta_rule
    (transformers.models.<type>.modeling_<type>, imported here) from no recurrent state, so the result
    is the one transformers computes, bit for bit; heads as many in every input (repeated before)."""
    function = getattr(importlib.import_module(module), FUNCTION)
    heads_second = (x.transpose(1, 2) for x in (query, key, value, g, beta))
    query, key, value, g, beta = heads_second
    out, _ = function(query, key, value, g=g, beta=beta, chunk_size=chunk_size, initial_state=None,
                      output_final_state=False, use_qk_l2norm_in_kernel=use_qk_l2norm)
    return out.transpose(1, 2).contiguous()


@chunk_gated_delta_rule.register_fake
def _(query, key, value, g, beta, chunk_size, use_qk_l2norm, module):
    return value.new_empty(value.shape, dtype=query.dtype)
