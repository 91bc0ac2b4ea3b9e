"""MoE layers written as a Python loop over the experts (JetMoE), and the expert loops torch.export
cannot capture (DBRX's, transformers' eager experts: a loop over the experts that receive tokens).

JetMoE runs each expert as linear(x_e, select(W, 0, e)) on its rows (a data-dependent split),
joins them with cat and adds them back in token order with index_add, in its MLP and in its
mixture-of-attention queries. The planner takes the loop's selects of one W as one projection:
column-parallel on W's output features, row-parallel after, one all_reduce per block.
"""
import re
from functools import lru_cache

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.capture.export import CaptureError
from fxtp.node_meta import LAYOUT, STATE
from fxtp.sharding.layouts import Shard
from fxtp.stats import OUTSIDE_LAYERS, collectives_by_layer, planned_state_bytes
from fxtp.testing import assert_equivalent, padded_batch
from fxtp.tiny_configs import generic_tiny_config, tiny_model
from op_harness import P, R, arg, aten, run_op

# 4 kv heads of 16 (JetMoE-8B has 16 of 128): heads that divide over 2 and 4 ranks, 2+1+1 over 3
WIDE_HEADS = {"num_key_value_heads": 4, "kv_channels": 16}


@lru_cache(maxsize=None)
def jetmoe(world_size: int, layers: int, experts: int = 4, wide: bool = False):
    """Tiny JetMoE (export is slow on its data-dependent splits, one per expert: the default test has
    one layer of 2 experts)."""
    config = generic_tiny_config("jetmoe")
    sizes = {"num_hidden_layers": layers, "num_local_experts": experts, **(WIDE_HEADS if wide else {})}
    for key, value in sizes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).float().eval()
    return model, fxtp.compile(model, world_size)


def state_fraction(tp, rank: int) -> float:
    return planned_state_bytes(tp, rank) / sum(t.numel() * t.element_size() for t in tp.captured.state.values())


def test_jetmoe_expert_loops_sharded():
    """At N=2 (was 0.03 of the state sharded): both expert loops of each layer, the MLP's and the
    attention's, are column- then row-parallel, kv_proj with the queries; one all_reduce closes each
    block; the routers alone stay replicated, for their top-k over every expert's logit."""
    model, tp = jetmoe(2, layers=1, experts=2, wide=True)
    assert_equivalent(model, 2, **padded_batch(model), program=tp, atol=1e-5)
    assert all(state_fraction(tp, r) <= 0.55 for r in range(2))
    by_layer = collectives_by_layer(tp.rank_graph(0))
    by_layer.pop(OUTSIDE_LAYERS, None)
    assert by_layer == {"model.layers.0": {"all_reduce": 2}}
    groups = fxtp.dump(tp).split("State (")[0]
    layouts = {n.meta[STATE]: n.meta[LAYOUT] for n in tp.graph.graph.nodes if STATE in n.meta}
    for block in ("model.layers.0.mlp.", "model.layers.0.self_attention.experts."):
        assert f"column-parallel  {block}input_linear.weight\n" in groups
        assert f"row-parallel     {block}output_linear.weight\n" in groups
        assert f"replicated       {block}router.layer.weight\n" in groups
        assert layouts[f"{block}router.layer.weight"] == R
    assert "aten.topk.default along the sharded dim" in groups
    assert isinstance(layouts["model.layers.0.self_attention.kv_proj.weight"], Shard)
    # each expert's rows are the data-dependent split: the loop is in the graph, per expert
    assert sum(n.target is aten.select.int and n.args[0].meta.get(STATE) == "model.layers.0.mlp.input_linear.weight"
               for n in tp.graph.graph.nodes) == 2


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_jetmoe_wide_heads(world_size):
    """With 4 kv heads every rank holds at most 1/N + 0.05 of the state (heads 2+1+1 at N=3: the
    queries' [top_k, heads * 16] -> [top_k * heads, 16] regroups whole heads)."""
    model, tp = jetmoe(world_size, layers=2, wide=True)
    assert_equivalent(model, world_size, **padded_batch(model), program=tp, atol=1e-5)
    assert all(state_fraction(tp, r) <= 1 / world_size + 0.05 for r in range(world_size))


# x[6, 4] added by rows into zeros[5, 4] along dim 0 (the ranks' layouts of x -> the result's)
@pytest.mark.parametrize("x_layout, want", [(P, P), (Shard(1, (2, 2)), Shard(1, (2, 2))), (Shard(0, (3, 3)), R)])
def test_index_add_of_rows(x_layout, want):
    """A Partial added into zeros stays Partial; a shard of the columns passes (zeros sliced alike); a
    shard of the added rows is gathered."""
    g = torch.Generator().manual_seed(4)
    args = {"x": arg(g, [6, 4], x_layout, 2), "idx": arg(g, [6], R, 2, kind="int5")}
    run = run_op(lambda x, idx: torch.zeros(5, 4).index_add(0, idx, x), args, 2)
    assert run.layout(aten.index_add.default) == want, run.describe()


def test_index_add_of_partial_into_values():
    """A Partial added into values other than zeros needs the sum first: each rank would add them."""
    g = torch.Generator().manual_seed(5)
    args = {"x": arg(g, [6, 4], P, 2), "base": arg(g, [5, 4], R, 2), "idx": arg(g, [6], R, 2, kind="int5")}
    run = run_op(lambda x, base, idx: base.index_add(0, idx, x), args, 2)
    assert run.layout(aten.index_add.default) == R, run.describe()


def test_dbrx_refused_naming_its_loop():
    """DBRX's experts loop over `expert_hit` (nonzero of the routed counts) and it has no experts
    implementation to switch to: the refusal names the loop's line and says that no option avoids it."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_tiny_config("dbrx"), dtype=torch.float32).float().eval()
    with pytest.raises(CaptureError) as refused:
        fxtp.compile(model, 2)
    first = str(refused.value).splitlines()[0]
    assert re.search(r"modeling_dbrx\.py:\d+ in forward: `for expert_idx in expert_hit:`", first), first
    assert "DbrxForCausalLM has no option that avoids it" in first


@pytest.mark.slow  # the default run keeps DBRX's refusal, the same check of the same loop
def test_eager_experts_refused_naming_the_option():
    """transformers' eager experts (the same loop) in a model that can switch: the refusal names the call."""
    model = tiny_model("mixtral", layers=1)
    model.set_experts_implementation("eager")
    with pytest.raises(CaptureError) as refused:
        fxtp.compile(model, 2)
    first = str(refused.value).splitlines()[0]
    assert 'call model.set_experts_implementation("grouped_mm")' in first and "modeling_mixtral.py" in first, first
