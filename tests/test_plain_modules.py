"""fxtp.compile of plain nn.Modules (no HF config): torch's own tensor-parallel test Transformer,
whose automatic plan must be the one torch's tests write by hand, and a single-file GPT."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed._tensor.common_dtensor import ModelArgs, Transformer
from torch.testing._internal.distributed.fake_pg import FakeStore

import fxtp
from fxtp.capture.state_names import aliases
from fxtp.sharding.roles import Role

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


@pytest.mark.parametrize("world_size", [2, 3, 4])
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
