"""Whole-model equivalence and structure for the Llama family (tiny configs, simulated ranks)."""
import pytest
import torch
from hypothesis import given, settings
from transformers import AutoConfig, AutoModelForCausalLM

import fxtp
from fxtp.tiny_configs import LLAMA_FAMILY
from fxtp.sharding.roles import Role
from fxtp.stats import collectives_by_layer, planned_state_bytes, state_bytes, OUTSIDE_LAYERS
from fxtp.testing import architectures, assert_equivalent, token_batches, world_sizes, tiny_program

program = tiny_program


@pytest.mark.parametrize("arch", LLAMA_FAMILY)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_arch_and_world_size(arch, world_size):
    model, tp = program(arch, world_size)
    ids = torch.randint(1, 256, (3, 11), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    assert_equivalent(model, world_size, ids, mask, program=tp)
    assert_equivalent(model, world_size, ids, None, program=tp)
    assert sorted(g.role for g in tp.plan.groups if g.sharded) == sorted(["column-parallel"] * 4 + [
        Role.COLUMN_GATHERED, Role.VOCAB_PARALLEL]), "attention and MLP of both layers are column-parallel, embedding and lm_head vocab-sharded"


@settings(max_examples=20, deadline=None)
@given(arch=architectures(LLAMA_FAMILY), world_size=world_sizes(), batch=token_batches(max_batch=4, max_seq=64))
def test_equivalence_property(arch, world_size, batch):
    model, tp = program(arch, world_size)
    assert_equivalent(model, world_size, *batch, program=tp)


@pytest.mark.slow  # more draws of test_equivalence_property, which runs by default
@settings(max_examples=60, deadline=None)
@given(arch=architectures(LLAMA_FAMILY), world_size=world_sizes(), batch=token_batches(max_batch=4, max_seq=64))
def test_equivalence_property_more_draws(arch, world_size, batch):
    model, tp = program(arch, world_size)
    assert_equivalent(model, world_size, *batch, program=tp)


@pytest.mark.parametrize("arch", LLAMA_FAMILY)
@pytest.mark.parametrize("world_size", [2, 3])
def test_two_all_reduce_per_decoder_layer(arch, world_size):
    _, tp = program(arch, world_size)
    by_layer = collectives_by_layer(tp.rank_graph(0))
    assert by_layer == {**{f"model.layers.{i}": {"all_reduce": 2} for i in range(2)},
                        OUTSIDE_LAYERS: {"all_reduce": 1, "all_gather": 1}}  # the embedding's sum, the logits


def test_rank_module_holds_only_its_shards():
    model, tp = program("llama", 2)
    gm = tp.rank_graph(1)
    assert isinstance(gm, torch.fx.GraphModule)
    params = dict(gm.named_parameters())
    assert params["model.layers.0.self_attn.q_proj.weight"].shape == (32, 64)
    assert params["model.layers.0.self_attn.o_proj.weight"].shape == (64, 32)
    assert params["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)
    full = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(params["model.layers.0.mlp.up_proj.weight"], full[64:])
    share = state_bytes(gm, "model.layers.") / state_bytes(model, "model.layers.")
    assert abs(share - 0.5) <= 0.01, share  # only the norms' weights are replicated


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_llama3_8b_layer_params_per_rank_on_meta(world_size):
    """Llama-3-8B shape planned on the meta device: decoder-layer state per rank within 2% of 1/N."""
    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tp = fxtp.compile(model, world_size)
    layers = sum(v.numel() * v.element_size() for k, v in tp.captured.state.items() if k.startswith("model.layers."))
    for rank in range(world_size):
        share = planned_state_bytes(tp, rank, "model.layers.") / layers
        assert abs(share - 1 / world_size) <= 0.02 / world_size, (rank, share)


def test_uneven_heads_are_head_aligned():
    _, tp = program("llama", 3)
    q = tp.rank_graph(0).get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert [tp.rank_graph(r).get_parameter("model.layers.0.self_attn.q_proj.weight").shape[0] for r in range(3)] == [32, 16, 16]
    assert q.shape[0] % 16 == 0
    attention = next(g for g in tp.plan.groups if "model.layers.0.self_attn.q_proj.weight" in g.weights)
    assert "kept replicated" in attention.reason
