"""Manual plans in fxtp's form, as an HF tp_plan and as a DeepSpeed injection_policy."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import fxtp
from fxtp.node_meta import LAYOUT, STATE
from fxtp.tiny_configs import tiny_model
from fxtp.sharding.layouts import Shard
from fxtp.passes.sharding.manual_plan import PlanError
from fxtp.stats import collectives_by_layer
from fxtp.testing import assert_equivalent, tiny_program

ATTENTION_ONLY = {"*.q_proj": "colwise", "*.k_proj": "colwise", "*.v_proj": "colwise", "*.o_proj": "rowwise"}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def batch():
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def layer_layouts(tp):
    return {n.meta[STATE]: n.meta[LAYOUT] for n in tp.graph.graph.nodes
            if STATE in n.meta and ".layers.0." in n.meta[STATE] and n.meta[STATE].endswith("weight")}


@pytest.mark.parametrize("world_size", [2, 4])
def test_fxtp_form_shards_only_what_it_names(llama, world_size):
    tp = fxtp.compile(llama, world_size, plan=ATTENTION_ONLY)
    assert_equivalent(llama, world_size, *batch(), program=tp)
    layouts = layer_layouts(tp)
    assert isinstance(layouts["model.layers.0.self_attn.q_proj.weight"], Shard)
    assert isinstance(layouts["model.layers.0.self_attn.o_proj.weight"], Shard)
    assert not isinstance(layouts["model.layers.0.mlp.up_proj.weight"], Shard)
    counts = collectives_by_layer(tp.rank_graph(0))
    assert counts["model.layers.0"]["all_reduce"] == 1


@pytest.mark.parametrize("spelling", ["tp_plan", "injection_policy"])
def test_hf_and_deepspeed_forms_match_the_automatic_plan(llama, spelling):
    kwargs = {"tp_plan": "auto"} if spelling == "tp_plan" else \
        {"injection_policy": {LlamaDecoderLayer: ("self_attn.o_proj", "mlp.down_proj")}}
    manual = fxtp.compile(llama, 2, **kwargs)
    automatic = tiny_program("llama", 2)[1]  # the llama fixture's automatic program
    assert layer_layouts(manual) == layer_layouts(automatic)
    assert_equivalent(llama, 2, *batch(), program=manual)
    assert "column-parallel" in fxtp.dump(manual)


def test_rowwise_without_a_sharded_input_names_the_node(llama):
    with pytest.raises(PlanError, match=r"o_proj is rowwise, but its input .* node=.*mark the projections that feed it colwise"):
        fxtp.compile(llama, 2, plan={"*.o_proj": "rowwise"})


def test_bad_manual_plans(llama):
    with pytest.raises(PlanError, match="unknown styles"):
        fxtp.compile(llama, 2, plan={"*.q_proj": "diagonal"})
    with pytest.raises(PlanError, match="no such module"):
        fxtp.compile(llama, 2, injection_policy={"T5Block": ("SelfAttention.o",)})
    with pytest.raises(ValueError, match="give one of"):
        fxtp.compile(llama, 2, plan=ATTENTION_ONLY, tp_plan="auto")


@pytest.mark.parametrize("pattern, closest", [("*.q_projj", "*.q_proj"), ("self_attn.o_proj", "*.self_attn.o_proj")])
def test_a_pattern_that_matches_no_module_names_the_closest(llama, pattern, closest):
    """A typo, or a name not anchored at the model's root, would leave its projections replicated without a word."""
    plan = {**ATTENTION_ONLY, pattern: "rowwise" if "o_proj" in pattern else "colwise"}
    with pytest.raises(PlanError) as raised:
        fxtp.compile(llama, 2, plan=plan)
    message = str(raised.value)
    assert f"pattern {pattern!r} matches no module" in message
    assert message.index(repr(closest)) < message.index("(e.g. model.layers.0."), message  # the closest comes first
    assert "full module names with fnmatch" in message and "'*.'" in message


def test_an_injection_policy_name_in_no_block_names_the_closest(llama):
    with pytest.raises(PlanError, match=r"'self_attn\.o_projj' is in no LlamaDecoderLayer.*closest 'self_attn\.o_proj'"):
        fxtp.compile(llama, 2, injection_policy={LlamaDecoderLayer: ("self_attn.o_projj", "mlp.down_proj")})
