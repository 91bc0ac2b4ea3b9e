"""fxtp.compile of plain nn.Modules (no HF config): torch's own tensor-parallel test Transformer,
whose automatic plan must be the one torch's tests write by hand, and a single-file GPT."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed._tensor.common_dtensor import ModelArgs, Transformer
from torch.testing._internal.distributed.fake_pg import FakeStore

import fxtp
from fxtp.capture.state_names import aliases
from fxtp.runtime.rank_processes import run_ranks
from fxtp.sharding.roles import Role
from fxtp.stats import planned_state_bytes, state_bytes

VOCAB = 64


def torch_transformer(weight_tying: bool = True) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(n_layers=2, vocab_size=VOCAB, max_seq_len=32, dim=64, n_heads=4, dropout_p=0.0,
                     weight_tying=weight_tying)
    return Transformer(args).eval()


def token_ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def assert_exact(tp: fxtp.TPProgram, model: torch.nn.Module, *inputs: torch.Tensor) -> None:
    """Every rank returns the module's output; fp32 max abs diff <= 1e-5 relative to the logit scale
    (DESIGN.md's contract: a sum over N ranks rounds differently from one GEMM)."""
    with torch.no_grad():
        expected = model(*inputs)
    outputs = tp.simulate_ranks(*inputs)
    for out in outputs:
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert torch.equal(out, outputs[0])
    scale = max(1.0, expected.abs().max().item())
    assert (outputs[0] - expected).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("world_size", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_torch_transformer_is_exact(world_size):
    model = torch_transformer()
    tp = fxtp.compile(model, world_size, example_inputs=(token_ids(2, 8),))
    for batch, seq in ((2, 8), (1, 5), (3, 17)):  # batch and seq are dynamic
        assert_exact(tp, model, token_ids(batch, seq))


def module_of(model: torch.nn.Module, weight_name: str) -> str:
    """The module of a weight, one name for a tied tensor (the first of its names in sorted order)."""
    return min([weight_name, *aliases(model).get(weight_name, [])]).rsplit(".", 1)[0]


def torch_hand_written_plan(model: Transformer, world_size: int) -> dict[str, set[str]]:
    """The plan torch's own tests give this model (Transformer.parallelize, no sequence parallelism), read
    from the placements it puts on the parameters: {"colwise" | "rowwise" | "vocab": module names}."""
    dist.init_process_group(backend="fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        Transformer.parallelize(model, init_device_mesh("cpu", (world_size,)), use_seq_parallel=False)
        plan: dict[str, set[str]] = {"colwise": set(), "rowwise": set(), "vocab": set()}
        for name, param in model.named_parameters(remove_duplicate=False):
            if not name.endswith(".weight") or not isinstance(param, DTensor):
                continue
            (placement,) = param.placements
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.Embedding):
                plan["vocab"].add(module_of(model, name))
            elif placement == Shard(0):
                plan["colwise"].add(module_of(model, name))
            elif placement == Shard(1):
                plan["rowwise"].add(module_of(model, name))
        return plan
    finally:
        dist.destroy_process_group()


def fxtp_plan(tp: fxtp.TPProgram) -> dict[str, set[str]]:
    """fxtp's automatic plan in the same terms."""
    kinds = {Role.COLUMN_PARALLEL: "colwise", Role.COLUMN_GATHERED: "colwise", Role.ROW_PARALLEL: "rowwise",
             Role.VOCAB_PARALLEL: "vocab"}
    plan: dict[str, set[str]] = {"colwise": set(), "rowwise": set(), "vocab": set()}
    for group in tp.plan.groups:
        if group.role in kinds:
            plan[kinds[group.role]] |= {module_of(tp.model, weight) for weight in group.weights}
    return plan


@pytest.mark.parametrize("weight_tying", [True, False], ids=["tied", "untied"])
def test_torch_transformer_plan_is_torchs_hand_written_one(weight_tying):
    model = torch_transformer(weight_tying)
    tp = fxtp.compile(model, 2, example_inputs=(token_ids(2, 8),))
    got, expected = fxtp_plan(tp), torch_hand_written_plan(torch_transformer(weight_tying), 2)
    assert got["colwise"] == {f"layers.{i}.{m}" for i in (0, 1) for m in (
        "attention.wq", "attention.wk", "attention.wv", "feed_forward.w1")} | {"output"}
    assert got["rowwise"] == {f"layers.{i}.{m}" for i in (0, 1) for m in ("attention.wo", "feed_forward.w2")}
    assert got["vocab"] == {module_of(model, "tok_embeddings.weight")}  # tied: the output's weight, one shard for both
    assert got["colwise"] == expected["colwise"] and got["rowwise"] == expected["rowwise"]
    # torch's plan shards the position table too (RowwiseParallel: one more all_reduce per forward, for a
    # [max_seq_len, dim] table); fxtp keeps position tables replicated by design (passes/sharding/plan.py)
    assert expected["vocab"] == got["vocab"] | {"pos_embeddings"}


# A single-file GPT as people write one: fused qkv, grouped-query attention, RMSNorm, SwiGLU, tied lm_head.
# `repeat_kv` chooses how kv heads are repeated for their query heads: torch's repeat_interleave, or the
# expand + reshape HF's repeat_kv uses.
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, repeat_kv: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.repeat_kv = heads, kv_heads, dim // heads, repeat_kv
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def repeat(self, t):
        groups = self.heads // self.kv_heads
        if self.repeat_kv == "repeat_interleave":
            return t.repeat_interleave(groups, dim=1)
        b, _, s, d = t.shape
        return t[:, :, None].expand(b, self.kv_heads, groups, s, d).reshape(b, self.heads, s, d)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = (t.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        y = F.scaled_dot_product_attention(q, self.repeat(k), self.repeat(v), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), \
            nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, repeat_kv):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim), Attention(dim, heads, kv_heads, repeat_kv)
        self.mlp_norm, self.mlp = RMSNorm(dim), SwiGLU(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, vocab=64, dim=96, layers=2, heads=6, kv_heads=2, tied=True, repeat_kv="repeat_interleave"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, repeat_kv) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


# by default two of the eight: each form of GQA, each tying, each world size once
@pytest.mark.parametrize("world_size, tied, repeat_kv", [
    (size, tied, repeat) if (size, tied, repeat) in ((2, True, "repeat_interleave"), (3, False, "expand")) else
    pytest.param(size, tied, repeat, marks=pytest.mark.slow)
    for size in (2, 3) for tied in (True, False) for repeat in ("repeat_interleave", "expand")])
def test_gpt_is_exact(world_size, tied, repeat_kv):
    torch.manual_seed(0)
    model = GPT(tied=tied, repeat_kv=repeat_kv).eval()
    tp = fxtp.compile(model, world_size, example_inputs=(token_ids(2, 8),))
    for batch, seq in ((2, 8), (3, 11)):
        assert_exact(tp, model, token_ids(batch, seq))


@pytest.mark.parametrize("repeat_kv", ["repeat_interleave", "expand"])
def test_gpt_is_sharded(repeat_kv):
    """Every projection is sharded (none left replicated), and a rank holds at most 0.55 of the state at N=2."""
    torch.manual_seed(0)
    model = GPT(repeat_kv=repeat_kv).eval()
    tp = fxtp.compile(model, 2, example_inputs=(token_ids(2, 8),))
    assert [g.weights for g in tp.plan.groups if g.role is Role.REPLICATED] == []
    roles = {weight: g.role for g in tp.plan.groups for weight in g.weights}
    assert roles["blocks.0.attn.proj.weight"] is Role.ROW_PARALLEL and roles["blocks.0.mlp.down.weight"] is Role.ROW_PARALLEL
    for rank in range(2):
        assert planned_state_bytes(tp, rank) <= 0.55 * state_bytes(model)


def test_gpt_rank_graphs_dump_and_manual_plan():
    torch.manual_seed(0)
    model = GPT().eval()
    ids = token_ids(2, 8)
    tp = fxtp.compile(model, 2, example_inputs=(ids,))
    graph = tp.rank_graph(1)
    assert [n.name for n in graph.graph.nodes if n.op == "placeholder"] == ["ids"]  # the module's own input name
    assert graph.get_parameter("blocks.0.mlp.gate.weight").shape == (192, 96)  # its half of the 384 features
    text = fxtp.dump(tp)
    assert text.startswith("fxtp plan: GPT, world_size=2")
    assert "ids                          input" in text and "[batch, seq]" in text
    # a manual plan names the module's own modules; an MLP-only plan leaves attention replicated
    manual = fxtp.compile(model, 2, example_inputs=(ids,), plan={"*.mlp.gate": "colwise", "*.mlp.up": "colwise",
                                                                 "*.mlp.down": "rowwise"})
    roles = {weight: g.role for g in manual.plan.groups for weight in g.weights}
    assert roles["blocks.1.mlp.up.weight"] is Role.COLUMN_PARALLEL and roles["blocks.1.mlp.down.weight"] is Role.ROW_PARALLEL
    assert manual.rank_graph(0).get_parameter("blocks.0.attn.proj.weight").shape == (96, 96)
    assert_exact(manual, model, token_ids(3, 5))


def gpt_rank_logits(rank, ids):
    """Rank body (a spawned process): the seeded GPT's rank module under a real gloo group."""
    torch.manual_seed(0)
    return fxtp.compile(GPT().eval(), 2, example_inputs=(ids,)).module(rank)(ids)


@pytest.mark.slow  # rank modules on real processes: by default for HF models (test_multiprocess.py)
def test_gpt_rank_modules_on_real_processes():
    ids = token_ids(2, 8)
    torch.manual_seed(0)
    model = GPT().eval()
    with torch.no_grad():
        expected = model(ids)
    for logits in run_ranks(gpt_rank_logits, 2, ids):
        assert (logits - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


class FeatureMLP(nn.Module):
    """A module of floats only: [batch, seq, 32] features in, [batch, seq, 32] out."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def test_floats_only_module_needs_dynamic_shapes():
    torch.manual_seed(0)
    model, x = FeatureMLP().eval(), torch.randn(2, 8, 32)
    with pytest.raises(TypeError, match=r"hold no token ids.*pass dynamic_shapes="):
        fxtp.compile(model, 2, example_inputs=(x,))
    dims = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)
    tp = fxtp.compile(model, 2, example_inputs=(x,), dynamic_shapes=dims)
    assert {g.role for g in tp.plan.groups} == {Role.COLUMN_PARALLEL, Role.ROW_PARALLEL}
    assert_exact(tp, model, torch.randn(3, 5, 32))


def test_plain_module_needs_example_inputs_of_tensors():
    model = torch_transformer()
    with pytest.raises(TypeError, match=r"Transformer has no HF config.*pass example_inputs=\(input_ids,\)"):
        fxtp.compile(model, 2)
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a tuple of tensors.*0: list"):
        fxtp.compile(model, 2, example_inputs=([[1, 2, 3]],))
    with pytest.raises(TypeError, match=r"torch.nn.Module.*got str"):
        fxtp.compile("Transformer", 2, example_inputs=(token_ids(2, 8),))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 32), nn.Linear(32, VOCAB)

    def forward(self, ids):
        hidden = self.embed(ids)
        return {"logits": self.head(hidden), "hidden": hidden}


def test_output_must_be_one_tensor():
    with pytest.raises(TypeError, match=r"TwoOutputs.forward returns a dict of 2; fxtp compiles a plain module whose "
                                        r"forward returns one tensor"):
        fxtp.compile(TwoOutputs(), 2, example_inputs=(token_ids(2, 8),))


def test_world_size_above_the_heads_in_the_graph():
    with pytest.raises(ValueError, match=r"world_size=5 is larger than the 4 attention heads fxtp finds in "
                                         r"Transformer's graph.*use world_size <= 4"):
        fxtp.compile(torch_transformer(), 5, example_inputs=(token_ids(2, 8),))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)

    def forward(self, ids):
        return self.embed(ids[:, : int(ids.max())])  # a length read from the data: export cannot trace it


def test_export_failure_says_what_to_pass():
    with pytest.raises(fxtp.CaptureError, match=r"(?s)could not capture DataDependent:.*pass dynamic_shapes="):
        fxtp.compile(DataDependent(), 2, example_inputs=(token_ids(2, 8),))


def test_hf_only_features_are_refused():
    model = torch_transformer()
    ids = token_ids(2, 8)
    tp = fxtp.compile(model, 2, example_inputs=(ids,))
    needs_hf = r"needs a HF model .*Transformer is a plain nn.Module"
    with pytest.raises(TypeError, match="generate " + needs_hf):
        tp.generate(ids, max_new_tokens=2)
    with pytest.raises(TypeError, match="with_cache " + needs_hf):
        tp.with_cache(2, 16)
    with pytest.raises(TypeError, match="generation " + needs_hf):
        tp.generator()
    with pytest.raises(TypeError, match=r"checkpoint= \(loading slices by HF state names\) " + needs_hf):
        tp.rank_graph(0, checkpoint="/nonexistent")
    with pytest.raises(TypeError, match="fxtp.parallelize takes a HF model"):
        fxtp.parallelize(model)
    with pytest.raises(ValueError, match="tp_plan='auto' reads the plan a HF model declares"):
        fxtp.compile(model, 2, example_inputs=(ids,), tp_plan="auto")
    with pytest.raises(TypeError, match=r"2 inputs given, but this Transformer program takes 1: \['tokens'\]"):
        tp.simulate(ids, ids)


def test_hf_model_takes_no_example_inputs():
    from fxtp.tiny_configs import tiny_model
    with pytest.raises(ValueError, match="example_inputs and dynamic_shapes are for plain nn.Modules"):
        fxtp.compile(tiny_model("llama"), 2, example_inputs=(token_ids(2, 8),))
