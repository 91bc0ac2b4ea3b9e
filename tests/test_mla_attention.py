"""MLA attention (DeepSeek-V2) sharded by heads: its keys, built in a buffer filled slice by slice,
become a cat (passes/capture/fills_as_cat.py), and of the low-rank chain q_a -> q_b the wider q_b is
the column-parallel one (passes/sharding/plan.py tries groups widest first)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.capture.state_names import parse_derived
from fxtp.passes.capture.fills_as_cat import fills_as_cat
from fxtp.sharding.roles import Role
from fxtp.stats import planned_state_bytes
from fxtp.testing import assert_equivalent
from fxtp.tiny_configs import generic_tiny_config

aten = torch.ops.aten
BATCH, SEQ = torch.export.Dim("batch"), torch.export.Dim("seq")


class Filled(torch.nn.Module):
    """MLA's key: the heads' own part, then a part shared by every head (broadcast by copy_)."""

    def __init__(self, bounds=((0, 8), (8, None))):
        super().__init__()
        self.bounds = bounds

    def forward(self, own, shared):
        out = own.new_empty(*own.shape[:-1], 16)
        for (start, end), source in zip(self.bounds, (own, shared)):
            out[..., start:end].copy_(source)
        return out * 2


def exported(module: torch.nn.Module, *args):
    shapes = tuple({0: BATCH, 2: SEQ} for _ in args)
    return torch.export.export(module, args, dynamic_shapes=shapes).graph_module


def targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_a_tiled_fill_becomes_a_cat():
    own, shared = torch.randn(2, 4, 5, 8), torch.randn(2, 1, 5, 8)
    gm = fills_as_cat(exported(Filled(), own, shared))
    assert aten.cat.default in targets(gm) and not targets(gm) & {aten.copy_.default, aten.new_empty.default}
    for batch, seq in ((2, 5), (3, 7)):  # the symbolic sizes stay symbolic
        own, shared = torch.randn(batch, 4, seq, 8), torch.randn(batch, 1, seq, 8)
        assert torch.equal(gm(own, shared)[0], Filled()(own, shared))


def test_a_fill_with_a_gap_is_left_alone():
    """A fill that leaves part of the buffer unwritten is no cat (the part is uninitialized memory)."""
    gm = fills_as_cat(exported(Filled(((0, 6), (8, None))), torch.randn(2, 4, 5, 6), torch.randn(2, 1, 5, 8)))
    assert aten.copy_.default in targets(gm) and aten.cat.default not in targets(gm)


def deepseek_v2():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(generic_tiny_config("deepseek_v2")).eval()


def left_padded_batch():
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("model_type, world_size", [("deepseek_v2", 2), ("deepseek_v2", 3), ("minicpm3", 2)])
def test_mla_attention_sharded_by_heads(model_type, world_size):
    """MiniCPM3's tiny q_a and kv_a (rank 32, as wide as 2 of its 4 heads) hold about as many bytes
    sharded as q_b and kv_b: the plan with fewer all_reduces, q_b's and kv_b's by heads, is kept."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_tiny_config(model_type)).eval()
    tp = fxtp.compile(model, world_size)
    roles = {weight: group.role for group in tp.plan.groups for weight in group.weights}
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        assert roles[prefix + "q_b_proj.weight"] is Role.COLUMN_PARALLEL and roles[prefix + "kv_b_proj.weight"] is Role.COLUMN_PARALLEL
        assert roles[prefix + "o_proj.weight"] is Role.ROW_PARALLEL
    assert_equivalent(model, world_size, *left_padded_batch(), program=tp, atol=1e-5)


def test_deepseek_v2_parameters_per_rank():
    """At most 0.55 of the parameters a rank at N=2 (it was 0.62 with the keys replicated)."""
    model = deepseek_v2()
    tp = fxtp.compile(model, 2)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    names = {name for name in tp.captured.state if (parse_derived(name) or (name,))[0] in parameters}
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert max(planned_state_bytes(tp, rank, names=names) for rank in range(2)) / whole <= 0.55
