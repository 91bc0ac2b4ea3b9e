"""Linear-attention layers (the gated delta rule of Qwen3.5 and its kin), captured with the loop over
chunks in one op (fxtp/rank_ops/delta_rule.py) and sharded by value heads.

Before, torch.export unrolled transformers' loop over 64-token chunks for the example's length, and a
prompt longer than one chunk computed one chunk only: a wrong answer with no error, at any world size."""
from functools import lru_cache

import pytest
import torch
from transformers import AutoModelForCausalLM

from fxtp.node_meta import LAYOUT, STATE
from fxtp.runtime.program import TPProgram
from fxtp.sharding.layouts import Shard
from fxtp.stats import held_state
from fxtp.testing import assert_equivalent
from fxtp.tiny_configs import generic_tiny_config
from fxtp.capture.export import capture

CHUNK = 64  # transformers' chunk size for the gated delta rule


@lru_cache(maxsize=None)
def qwen3_5():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_tiny_config("qwen3_5_text"), dtype=torch.float32).eval()
    return model, capture(model)


def batch(seq: int):
    ids = torch.randint(3, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def test_one_op_per_layer_and_no_unrolled_chunks():
    model, captured = qwen3_5()
    calls = [n for n in captured.graph_module.graph.nodes if "chunk_gated_delta_rule" in str(n.target)]
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_prompts_of_several_chunks(world_size):
    """Exact at 1, 2 and 3 chunks (32 value heads over 3 ranks: uneven)."""
    model, captured = qwen3_5()
    tp = TPProgram(captured, world_size, "auto", model)
    for seq in (9, CHUNK + 6, 2 * CHUNK + 3):
        assert_equivalent(model, world_size, *batch(seq), program=tp, atol=1e-5)


def test_heads_sharded():
    """in_proj_qkv's q, k and v pieces, in_proj_z, out_proj and the conv's weight, cut at q, k and v too, are
    sharded at N=2."""
    model, captured = qwen3_5()
    tp = TPProgram(captured, 2, "auto", model)
    layer = {n.meta[STATE]: n.meta[LAYOUT] for n in held_state(tp.graph)
             if n.meta[STATE].startswith("model.layers.0.linear_attn.")}
    for name in ("in_proj_qkv.weight", "out_proj.weight", "in_proj_z.weight", "conv1d.weight"):
        pieces = [layout for state, layout in layer.items() if state.startswith("model.layers.0.linear_attn." + name)]
        assert pieces and all(isinstance(layout, Shard) for layout in pieces), (name, pieces)


def test_the_op_is_transformers_function_bit_for_bit():
    from transformers.models.qwen3_5 import modeling_qwen3_5

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 70, 4, 16, generator=g), torch.randn(2, 70, 4, 16, generator=g)
    v = torch.randn(2, 70, 4, 8, generator=g)
    decay, beta = -torch.rand(2, 70, 4, generator=g), torch.rand(2, 70, 4, generator=g)
    expected, _ = modeling_qwen3_5.torch_chunk_gated_delta_rule(q, k, v, g=decay, beta=beta, use_qk_l2norm_in_kernel=True)
    heads_first = [x.transpose(1, 2) for x in (q, k, v, decay, beta)]
    out = torch.ops.fxtp.chunk_gated_delta_rule(*heads_first, 64, True, modeling_qwen3_5.__name__)
    assert torch.equal(out.transpose(1, 2), expected)
