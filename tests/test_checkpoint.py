"""Per-rank loading from safetensors: compile on meta, read only this rank's slices, same logits."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

import fxtp
from fxtp.runtime.checkpoint import CheckpointError, tensor_files
from fxtp.tiny_configs import tiny_config, tiny_model
from fxtp.runtime.rank_processes import run_ranks
from fxtp.runtime.simulate import simulate


def meta_model(arch: str, **overrides):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))


def max_logit_diff(model, ranks) -> float:
    """The largest difference between the simulated ranks' logits and the model's, on a left-padded batch."""
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        return max((out - expected).abs().max().item() for out in simulate(ranks, (ids, mask), {}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{arch: (model, checkpoint dir)}: llama saved in 5 shards with an index, gpt2 (tied) and gemma
    (a recomputed rotary buffer) as single files."""
    out = {}
    for arch, shard in (("llama", "100KB"), ("gpt2", "5GB"), ("gemma", "5GB")):
        model = tiny_model(arch)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path, max_shard_size=shard)
        out[arch] = (model, str(path))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_round_trip_on_meta(saved, arch, world_size):
    model, path = saved[arch]
    tp = fxtp.compile(meta_model(arch), world_size)
    ranks = [tp.rank_graph(r, device="cpu", checkpoint=path) for r in range(world_size)]
    assert max_logit_diff(model, ranks) <= 1e-4


def test_eager_attention_on_meta(saved):
    _, path = saved["llama"]
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    tp = fxtp.compile(meta, 2)
    assert max_logit_diff(model, [tp.rank_graph(r, device="cpu", checkpoint=path) for r in range(2)]) <= 1e-4


def test_constants_the_forward_makes_come_from_the_capture(tmp_path, monkeypatch):
    """A scalar the forward makes as torch.tensor(x, device=<meta>) (as transformers 5.17's eager
    mask does) keeps its value when captured on meta, and is not looked up in the checkpoint."""
    forward = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: forward(self, x) * torch.tensor(0.5, device=x.device))
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tp = fxtp.compile(meta_model("llama"), 2)
    assert [tp.captured.state[name].item() for name in sorted(tp.captured.constants)] == [0.5, 0.5]  # one a layer
    assert max_logit_diff(model, [tp.rank_graph(r, device="cpu", checkpoint=str(tmp_path)) for r in range(2)]) <= 1e-4


def test_sharded_index_is_used(saved):
    _, path = saved["llama"]
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    tp = fxtp.compile(meta_model("llama"), 2)
    gm = tp.rank_graph(1, device="cpu", checkpoint=path)
    model, _ = saved["llama"]
    torch.testing.assert_close(gm.get_parameter("model.layers.1.mlp.up_proj.weight"),
                               model.model.layers[1].mlp.up_proj.weight[64:], rtol=0, atol=0)


def test_checkpoint_of_another_shape_names_the_tensor(saved):
    _, path = saved["llama"]
    tp = fxtp.compile(meta_model("llama", intermediate=96), 2)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight'.*\[128, 64\].*\[96, 64\]"):
        tp.rank_graph(0, device="cpu", checkpoint=path)


def test_missing_tensor_and_missing_checkpoint(saved, tmp_path):
    _, path = saved["llama"]
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    del index["weight_map"]["model.norm.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in set(index["weight_map"].values()):
        os.symlink(os.path.join(path, name), broken / name)
    json.dump(index, open(broken / "model.safetensors.index.json", "w"))
    tp = fxtp.compile(meta_model("llama"), 2)
    with pytest.raises(CheckpointError, match="has no tensor 'model.norm.weight'"):
        tp.rank_graph(0, device="cpu", checkpoint=str(broken))
    with pytest.raises(CheckpointError, match="save_pretrained"):
        tp.rank_graph(0, device="cpu", checkpoint=str(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{arch: (model, checkpoint dir, program compiled on meta)} for MoE models that transformers
    stores in another form than it holds: per-expert `experts.<e>.w1/w3/w2.weight` (Mixtral: under `block_sparse_moe`) for
    the fused `mlp.experts.gate_up_proj` / `down_proj` (and `mlp.gate.weight`)."""
    out = {}
    for arch in ("mixtral", "qwen2_moe"):
        model = tiny_model(arch, layers=1)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        out[arch] = (model, str(path), fxtp.compile(meta_model(arch, layers=1), 2))
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_conversion_mapping_round_trip(converted, arch):
    """Compiled on meta, each rank's expert slices are built with transformers' conversion mapping
    from the per-expert checkpoint tensors: the same as slicing the model's fused tensors."""
    model, path, on_meta = converted[arch]
    assert "model.layers.0.mlp.experts.gate_up_proj" not in tensor_files(path)  # stored per expert
    on_cpu = fxtp.compile(model, 2)
    for rank in range(2):
        loaded = dict(on_meta.rank_graph(rank, device="cpu", checkpoint=path).named_parameters())
        sliced = dict(on_cpu.rank_graph(rank).named_parameters())
        assert loaded.keys() == sliced.keys()
        for name in loaded:
            torch.testing.assert_close(loaded[name], sliced[name], rtol=0, atol=0, msg=name)
    # logits of the program traced on meta, whose expert counts are transformers' off-CPU
    # histc on ints (fxtp/rank_ops/device_ops.py runs it on the CPU), and of the one traced on the CPU
    for program in (on_meta, on_cpu):
        ranks = [program.rank_graph(r, device="cpu", checkpoint=path) for r in range(2)]
        assert max_logit_diff(model, ranks) <= 1e-5


def test_missing_expert_names_the_conversion(converted):
    """An expert's gate missing: the error names the fused tensor and the tensors it is built from."""
    _, path, tp = converted["mixtral"]
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        kept = {n: f.get_tensor(n) for n in f.keys() if n != "model.layers.0.block_sparse_moe.experts.3.w1.weight"}
    broken = os.path.join(path, "broken.safetensors")
    save_file(kept, broken)
    with pytest.raises(CheckpointError, match=r"could not build 'model.layers.0.mlp.experts.gate_up_proj' from "
                                              r"checkpoint tensors \['model.layers.0.block_sparse_moe.experts.0.w1"):
        tp.rank_graph(0, device="cpu", checkpoint=broken)


def _load_rank(rank: int, path: str, ids: torch.Tensor) -> torch.Tensor:
    tp = fxtp.compile(meta_model("llama"), 2)
    gm = tp.module(rank, checkpoint=path)
    with torch.no_grad():
        return gm(ids)


def test_two_processes_load_their_slices(saved):
    model, path = saved["llama"]
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    outputs = run_ranks(_load_rank, 2, path, ids)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for out in outputs:
        assert (out - expected).abs().max().item() <= 1e-4
