"""Projections cut into unequal pieces (GQA/MQA q|k|v in one weight) are unfused at capture
(passes/capture/unfuse_projections.py): q is sharded by heads, the few kv heads kept replicated."""
from functools import lru_cache

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fxtp
from fxtp.node_meta import STATE
from fxtp.capture.state_names import derived_name, parse_derived
from fxtp.tiny_configs import tiny_config, tiny_model
from fxtp.sharding.layouts import balanced_counts
from fxtp.runtime.simulate import simulate
from fxtp.stats import OUTSIDE_LAYERS, collectives_by_layer, planned_state_bytes
from fxtp.testing import assert_equivalent

HEADS, HEAD_DIM = 4, 16
# arch -> (layer prefix, q's derived weight in layer 0, all_reduce per layer)
EXPECTED = {
    "phi3": ("model.layers", "model.layers.0.self_attn.qkv_proj.weight[0:64]", 2),
    "gpt_bigcode": ("transformer.h", "transformer.h.0.attn.c_attn.weight[0:64]", 2),
    # attention and MLP read the same norm and their Partials are summed: one all_reduce
    "falcon": ("transformer.h", "transformer.h.0.self_attention.query_key_value.weight[0:64]", 1),
}


def falcon_7b_style(**sizes):
    return AutoConfig.for_model("falcon", multi_query=True, new_decoder_architecture=False, parallel_attn=True,
                                bias=False, **sizes)


TINY_FALCON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=HEADS, vocab_size=256)
_models: dict = {}


def model_of(arch: str):
    if arch not in _models:
        torch.manual_seed(0)
        _models[arch] = AutoModelForCausalLM.from_config(falcon_7b_style(**TINY_FALCON)).eval() \
            if arch == "falcon" else tiny_model(arch)
    return _models[arch]


@lru_cache(maxsize=None)
def program_of(arch: str, world_size: int):
    """model_of(arch)'s program over `world_size` ranks, compiled once for the tests that read it."""
    return fxtp.compile(model_of(arch), world_size)


def batch():
    ids = torch.randint(1, 256, (3, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


@pytest.mark.parametrize("arch", list(EXPECTED))
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_equivalent(arch, world_size):
    tp = program_of(arch, world_size)
    assert_equivalent(model_of(arch), world_size, *batch(), program=tp)
    names = [n.meta[STATE] for n in tp.graph.graph.nodes if STATE in n.meta]
    assert EXPECTED[arch][1] in names, "the fused q|k|v weight is unfused into derived pieces"


def assert_q_sharded(arch, world_size):
    prefix, q_weight, all_reduces = EXPECTED[arch]
    tp = program_of(arch, world_size)
    for rank, heads in enumerate(balanced_counts(HEADS, world_size)):
        gm = tp.rank_graph(rank)
        assert dict(gm.named_parameters())[q_weight].shape[0] == heads * HEAD_DIM
    by_layer = collectives_by_layer(tp.rank_graph(0))
    assert {k: v for k, v in by_layer.items() if k != OUTSIDE_LAYERS} == \
        {f"{prefix}.{i}": {"all_reduce": all_reduces} for i in range(2)}


@pytest.mark.parametrize("arch", ["phi3", "gpt_bigcode"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_q_sharded_kv_as_unfused(arch, world_size):
    assert_q_sharded(arch, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_falcon_q_sharded(world_size):
    assert_q_sharded("falcon", world_size)


def test_equal_pieces_stay_fused():
    tp = program_of("phi3", 2)
    names = {n.meta[STATE] for n in tp.graph.graph.nodes if STATE in n.meta}
    assert "model.layers.0.mlp.gate_up_proj.weight" in names  # gate|up: two equal blocks
    assert "model.layers.0.self_attn.qkv_proj.weight" not in names


def test_derived_names():
    assert derived_name("a.w", 0, 64, 96) == "a.w[64:96]"
    assert parse_derived("a.w[:, 64:96]") == ("a.w", 1, 64, 96)
    assert parse_derived("a.w") is None
    # a block of a block along the same dim is one block of the stored tensor: loaders read one level
    assert derived_name("a.w[128:1280]", 0, 0, 128) == "a.w[128:256]"
    assert derived_name("a.w[:, 8:40]", 1, 4, 12) == "a.w[:, 12:20]"
    with pytest.raises(ValueError, match="along dim 0; a block of it along dim 1"):
        derived_name("a.w[128:1280]", 1, 0, 8)
    with pytest.raises(ValueError, match="outside"):
        derived_name("a.w[128:256]", 0, 100, 200)


@pytest.mark.parametrize("world_size", [2, 3])
def test_phi3_checkpoint_round_trip(tmp_path, world_size):
    model = model_of("phi3")
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("phi3"))
    tp = fxtp.compile(meta, world_size)
    ranks = [tp.rank_graph(r, device="cpu", checkpoint=str(tmp_path)) for r in range(world_size)]
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        outputs = simulate(ranks, (ids, mask), {})
    assert all((out - expected).abs().max().item() <= 1e-4 for out in outputs)


@pytest.mark.parametrize("world_size", [2, 8])
def test_falcon_7b_state_per_rank_on_meta(world_size):
    """On meta, the index constants that cut k/v off the fused q|k|v ([-2], [-1]) keep their
    values (capture indexes with CPU tensors), so q|k|v is unfused and q sharded by heads."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(falcon_7b_style(
            hidden_size=4544, num_attention_heads=71, num_hidden_layers=2, vocab_size=65024))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tp = fxtp.compile(model, world_size)
    per_rank = [planned_state_bytes(tp, r) for r in range(world_size)]
    assert max(per_rank) <= (1 / world_size + 0.02) * total, (per_rank, total)
