"""passes/sharding/plan.py: which of two plans is kept, and planning with reused rule decisions
(passes/sharding/propagate.py's `reusing_decisions`) annotates the graph as fresh propagations do."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
import fxtp.passes.sharding.propagate as propagate
from fxtp.node_meta import COLLECTIVE, LAYOUT, NOTE, REDUCE, STATE, WANTS
from fxtp.passes.sharding.plan import _cheaper
from fxtp.sharding.collectives import ALL_REDUCE
from fxtp.sharding.layouts import Shard, balanced_counts
from fxtp.sharding.roles import Role
from fxtp.stats import held_state
from fxtp.tiny_configs import generic_tiny_config, tiny_model


def annotations(model, world_size: int) -> tuple[list, list]:
    """Every node's layout, wants, all_reduce and note, and every group's decision."""
    tp = fxtp.compile(model, world_size)
    nodes = [(n.name, str(n.meta.get(LAYOUT)), sorted((k.name, str(v)) for k, v in n.meta.get(WANTS, {}).items()),
              n.meta.get(REDUCE), n.meta.get(NOTE)) for n in tp.graph.graph.nodes]
    return nodes, [(g.weights, g.role, g.reason, g.dropped) for g in tp.plan.groups]


@pytest.mark.parametrize("model_type, world_size", [("mixtral", 3), ("gpt2", 2), ("qwen3_next", 2)])
def test_reused_decisions_annotate_as_fresh_propagations(model_type, world_size, monkeypatch):
    """A MoE at uneven ranks, a fused q|k|v, a hybrid with linear attention: groups are accepted,
    rejected and partly kept replicated, and every node ends as rules run afresh leave it."""
    torch.manual_seed(0)
    model = tiny_model(model_type) if model_type != "qwen3_next" else \
        AutoModelForCausalLM.from_config(generic_tiny_config(model_type)).eval()
    reused = annotations(model, world_size)
    monkeypatch.setattr(propagate, "_KEPT_DECISIONS", 0)  # every decision made again
    assert annotations(model, world_size) == reused


def test_the_plan_kept_holds_fewer_bytes_or_about_as_many_with_fewer_all_reduces():
    assert _cheaper((1000, 9), (1100, 2))  # 9% fewer bytes: bytes decide
    assert not _cheaper((1100, 2), (1000, 9))
    assert _cheaper((1005, 2), (1000, 3))  # within 1%: fewer all_reduces
    assert not _cheaper((1000, 3), (1005, 2))
    assert not _cheaper((1000, 3), (1000, 3))  # a tie keeps the first plan (widest groups first)


def compiled(model: torch.nn.Module, world_size: int):
    """(ids, program, each weight's role) of a small module over `world_size` ranks."""
    model.eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    tp = fxtp.compile(model, world_size, example_inputs=(ids,))
    return ids, tp, {weight: group.role for group in tp.plan.groups for weight in group.weights}


def assert_ranks_exact(model: torch.nn.Module, tp, ids) -> None:
    with torch.no_grad():
        expected = model(ids)
    for out in tp.simulate_ranks(ids):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


class ViewedBlocks(torch.nn.Module):
    """A fused q|k|v viewed as [3, heads, head size] and a gate|up viewed as [2, I] (Moshi's MLP), each
    cut by selecting its blocks."""

    def __init__(self, vocab: int = 64, hidden: int = 32, heads: int = 4, intermediate: int = 24):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.fc1 = torch.nn.Linear(hidden, 2 * intermediate, bias=False)
        self.fc2 = torch.nn.Linear(intermediate, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, -1)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        gate_up = self.fc1(x).view(b, s, 2, -1)
        return self.head(x + self.fc2(torch.nn.functional.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_blocks_cut_off_a_viewed_axis_are_sharded_block_by_block(world_size):
    torch.manual_seed(0)
    model = ViewedBlocks()
    ids, tp, roles = compiled(model, world_size)
    assert roles["fc1.weight"] is Role.COLUMN_PARALLEL and roles["fc2.weight"] is Role.ROW_PARALLEL
    assert tp.plan.seeds["fc1.weight"] == Shard(0, balanced_counts(24, world_size), 1, 2)  # gate's and up's part
    assert roles["qkv.weight"] is Role.COLUMN_PARALLEL and roles["o.weight"] is Role.ROW_PARALLEL
    counts = {2: (2, 2), 3: (2, 1, 1)}[world_size]  # heads: whole ones, the same of q, k and v
    assert tp.plan.seeds["qkv.weight"] == Shard(0, counts, 8, 3)
    assert_ranks_exact(model, tp, ids)


class GroupedOutput(torch.nn.Module):
    """Attention whose output projection is grouped (DeepSeek-V4's o_a_proj, then o_b_proj): the heads'
    features in `groups` groups, group g multiplied by rows g*rank:(g+1)*rank of one weight in a bmm."""

    def __init__(self, groups: int, vocab: int = 64, hidden: int = 32, heads: int = 4, rank: int = 6):
        super().__init__()
        self.heads, self.groups = heads, groups
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.q, self.k, self.v = (torch.nn.Linear(hidden, hidden, bias=False) for _ in range(3))
        self.o_a = torch.nn.Linear(hidden // groups, groups * rank, bias=False)
        self.o_b = torch.nn.Linear(groups * rank, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, s, h = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(b * s, self.groups, -1).transpose(0, 1)
        w = self.o_a.weight.view(self.groups, -1, h // self.groups).transpose(1, 2)
        return self.head(x + self.o_b(torch.bmm(a, w).transpose(0, 1).reshape(b, s, -1)))


@pytest.mark.parametrize("groups, world_size, o_a", [
    (4, 2, Shard(0, (2, 2), 6)),        # whole groups a rank, as its heads: by group, o_b row-parallel
    (4, 3, Shard(0, (2, 1, 1), 6)),     # 4 heads over 3 ranks: their groups alike
    (1, 2, Shard(1, (2, 2), 8)),        # one group of all heads: row-parallel over the heads, o_b linear in its sum
    (2, 4, Shard(0, (2, 2, 1, 1), 1, 2)),  # a group spans ranks, attention whole: column-parallel in each group
])
def test_a_grouped_linear_is_planned_and_its_weight_sharded(groups, world_size, o_a):
    torch.manual_seed(0)
    model = GroupedOutput(groups)
    ids, tp, _ = compiled(model, world_size)
    assert any(group.weights == ["o_a.weight"] for group in tp.plan.groups)  # a projection the dump lists
    layouts = {n.meta[STATE]: n.meta[LAYOUT] for n in tp.graph.graph.nodes if STATE in n.meta}
    assert layouts["o_a.weight"] == o_a
    assert_ranks_exact(model, tp, ids)


def test_a_grouped_linear_kept_whole_is_listed_with_its_reason():
    """One output feature a group (a features dim of one element the reshape after it drops) cannot be
    split over 4 ranks: o_a stays whole, and the plan and the dump say so beside its name."""
    torch.manual_seed(0)
    model = GroupedOutput(2, rank=1)
    ids, tp, _ = compiled(model, 4)
    decision = next(group for group in tp.plan.groups if group.weights == ["o_a.weight"])
    assert decision.role is Role.REPLICATED and decision.reason == "1 units cannot be split over 4 ranks"
    assert "replicated       o_a.weight\n                     1 units cannot be split over 4 ranks" in fxtp.dump(tp)
    assert_ranks_exact(model, tp, ids)


class DifferentialAttention(torch.nn.Module):
    """DiffLlama's attention: two attention calls share q and k over the two halves of v's heads, their
    outputs are joined along the head dim and then cut in two along the heads, so head h and head
    h + heads/2 make one pair (o reads pair by pair)."""

    def __init__(self, vocab: int = 64, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.q, self.k, self.v = (torch.nn.Linear(hidden, hidden, bias=False) for _ in range(3))
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        v1, v2 = (half.repeat(1, 2, 1, 1) for half in torch.chunk(v, 2, dim=1))
        a = torch.cat([torch.nn.functional.scaled_dot_product_attention(q, k, vi, is_causal=True).transpose(1, 2)
                       for vi in (v1, v2)], dim=-1)
        a1, a2 = torch.chunk(a, 2, dim=2)
        return self.head(x + self.o((a1 - 0.5 * a2).reshape(b, s, -1)))


def test_heads_cut_in_pairs_after_attention_are_sharded_pair_by_pair():
    """q's and k's heads are cut only after attention (joined with another output along the head dim
    first): each rank takes its part of both halves, as of v's, which is cut before."""
    torch.manual_seed(0)
    model = DifferentialAttention()
    ids, tp, roles = compiled(model, 2)
    assert roles["q.weight"] is Role.COLUMN_PARALLEL and roles["o.weight"] is Role.ROW_PARALLEL
    for name in ("q.weight", "k.weight", "v.weight"):
        assert tp.plan.seeds[name] == Shard(0, (1, 1), 8, 2)  # one head of each half
    held = {n.meta[STATE]: n.meta[LAYOUT] for n in held_state(tp.graph)}
    assert held["o.weight"] == Shard(1, (1, 1), 16)  # one pair: its two heads' outputs side by side
    assert_ranks_exact(model, tp, ids)


class SparseGate(torch.nn.Module):
    """Gemma 3n's MLP with activation sparsity: the gate is cut off at its mean plus k standard
    deviations over the intermediate features."""

    def __init__(self, vocab: int = 64, hidden: int = 32, intermediate: int = 48):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.gate = torch.nn.Linear(hidden, intermediate, bias=False)
        self.up = torch.nn.Linear(hidden, intermediate, bias=False)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        gate = self.gate(x)
        cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * 1.6449
        return self.head(x + self.down(torch.nn.functional.gelu(torch.relu(gate - cutoff)) * self.up(x)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_gate_cut_off_by_its_statistics_is_column_parallel(world_size):
    """The mean and standard deviation over the sharded intermediate features are sums all-reduced
    (passes/capture/spread_as_sums.py), so gate and up are column-parallel and down row-parallel."""
    torch.manual_seed(0)
    model = SparseGate()
    ids, tp, roles = compiled(model, world_size)
    assert roles["gate.weight"] is Role.COLUMN_PARALLEL and roles["down.weight"] is Role.ROW_PARALLEL
    assert tp.plan.seeds["gate.weight"] == tp.plan.seeds["up.weight"] == Shard(0, balanced_counts(48, world_size))
    reduced = [n.meta[COLLECTIVE] for n in tp.rank_graph(0).graph.nodes if n.target is ALL_REDUCE]
    assert reduced == ["embedding", "mean", "div_tensor", "linear_2"]  # the cut-off's: the mean once, for both readers
    assert_ranks_exact(model, tp, ids)
