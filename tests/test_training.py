"""Training through the sharded graph (fxtp.compile(..., training=True)): each rank's loss equals the
unsharded model's and each rank's backward leaves its part of the unsharded gradient, in one process
(simulated ranks) and on real gloo processes; dropout masks agree where values are replicated; the
loss never gathers the logits; wrong uses get clear errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fxtp
from fxtp.capture.training import IGNORE_INDEX
from fxtp.node_meta import COLLECTIVE
from fxtp.runtime.rank_agreement import RanksDisagree
from fxtp.runtime.rank_processes import run_ranks
from fxtp.runtime.whole_state import state_layouts, whole_state
from fxtp.sharding import collectives, training_collectives
from fxtp.sharding.op_rules.dropout import sharded_dropout
from fxtp.testing import assert_trains_like_hf
from fxtp.tiny_configs import CAUSAL_LMS, tiny_model

SLOW = pytest.mark.slow


def training_batch(batch: int = 2, seq: int = 12, seed: int = 0, vocab: int = 256):
    """(input_ids, attention_mask, labels): row 1 left-padded by 3, labels ignored on the padding and
    on the first two positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    if batch > 1:
        mask[1, :3] = 0
        labels[1, :3] = IGNORE_INDEX
    return ids, mask, labels


# one representative per feature in the default suite: GQA + vocab-parallel loss (llama), dropout
# everywhere and fused q|k|v blocks (gpt2, uneven at 3), unequal fused pieces cut apart (phi3), MoE
# experts (mixtral), post-norms and soft-capping (gemma2 at 4); every causal LM at 2, 3 and 4 with FXTP_SLOW=1
DEFAULT_CASES = [("llama", 2), ("gpt2", 3), ("phi3", 2), ("mixtral", 3), ("gemma2", 4)]
ALL_CASES = [pytest.param(arch, n, marks=[] if (arch, n) in DEFAULT_CASES else SLOW)
             for arch in CAUSAL_LMS for n in (2, 3, 4)]


@pytest.mark.parametrize("arch,world_size", ALL_CASES)
def test_a_training_step_equals_the_unsharded_one(arch, world_size):
    model = tiny_model(arch)
    loss_diff, grad_diff = assert_trains_like_hf(model, world_size, *training_batch())
    assert loss_diff <= 1e-6 and grad_diff <= 1e-5


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world_size=st.integers(1, 4), batch=st.integers(1, 3), seq=st.integers(4, 20), seed=st.integers(0, 2**16))
def test_training_equivalence_holds_for_drawn_batches(world_size, batch, seq, seed):
    """Left padding, ignored labels, uneven splits (3 ranks over 4 heads and 2 kv heads); at least one
    position counts (all ignored is NaN, for HF too)."""
    model = tiny_model("llama")
    program = _program("llama", world_size)
    assert_trains_like_hf(model, world_size, *training_batch(batch, seq, seed), program=program)


@SLOW
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(CAUSAL_LMS), world_size=st.integers(1, 4), batch=st.integers(1, 3),
       seq=st.integers(4, 20), seed=st.integers(0, 2**16))
def test_training_equivalence_holds_for_drawn_architectures_and_batches(arch, world_size, batch, seq, seed):
    assert_trains_like_hf(tiny_model(arch), world_size, *training_batch(batch, seq, seed),
                          program=_program(arch, world_size))


_PROGRAMS: dict = {}


def _program(arch, world_size):
    if (arch, world_size) not in _PROGRAMS:
        _PROGRAMS[arch, world_size] = fxtp.compile(tiny_model(arch), world_size, training=True)
    return _PROGRAMS[arch, world_size]


def test_a_wrong_gradient_is_caught():
    """The equivalence check can fail: a program of a model with other weights trains differently."""
    other = _program("llama", 2)
    with pytest.raises(AssertionError):
        assert_trains_like_hf(tiny_model("llama", seed=1), 2, *training_batch(), program=other)


def test_dropout_draws_one_mask_for_the_whole_value():
    """Ranks seeded alike: the parts a sharded dropout keeps are the parts of the unsharded model's mask,
    and every rank's generator ends in the same state (so replicated dropouts after it agree)."""
    x = torch.ones(3, 10)
    torch.manual_seed(5)
    whole = torch.dropout(x, 0.5, True)
    parts, states = [], []
    for rank in range(2):
        torch.manual_seed(5)
        parts.append(sharded_dropout(x[:, :5] if rank == 0 else x[:, 5:], 0.5, True, 1, (5, 5), 1, 1, rank))
        states.append(torch.random.get_rng_state())
    assert torch.equal(torch.cat(parts, 1), whole)
    assert torch.equal(states[0], states[1])
    assert not torch.equal(parts[0], parts[1])  # independent masks on the two parts


def test_gpt2_dropout_matches_under_the_same_seed_only():
    """GPT-2's tiny config has dropout 0.1 on embeddings, attention and residuals: the sharded step
    equals the unsharded one under the same seed, and another seed gives another loss."""
    model = tiny_model("gpt2")
    assert model.config.attn_pdrop > 0 and model.config.resid_pdrop > 0
    program = _program("gpt2", 2)
    ids, mask, labels = training_batch()
    torch.manual_seed(0)
    first = program.simulate(ids, mask, labels)[0]
    torch.manual_seed(1)
    second = program.simulate(ids, mask, labels)[0]
    assert first.item() != second.item()


def test_the_loss_gathers_no_logits_and_halves_the_parameters():
    """Vocab-parallel cross entropy: the lm_head stays sharded, the rank graph has no all_gather, each
    rank returns its own vocabulary columns, and a rank holds about half of the parameters at 2 ranks."""
    model = tiny_model("llama")
    program = _program("llama", 2)
    module = program.lockstep_modules()[0]
    gathers = [n for n in module.graph.nodes if n.target in (training_collectives.gather_shard,
                                                               collectives.all_gather_shard)]
    assert gathers == []
    assert "gathered" not in fxtp.dump(program)
    assert state_layouts(program.graph)["lm_head.weight"] != state_layouts(program.graph)["model.norm.weight"]
    ids, mask, labels = training_batch()
    outputs = program.simulate_ranks(ids, mask, labels)
    vocab = model.config.vocab_size
    assert [tuple(out[1].shape) for out in outputs] == [(2, 12, vocab // 2)] * 2
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(torch.cat([out[1] for out in outputs], -1), expected, atol=1e-5)
    share = sum(p.numel() for p in module.parameters()) / sum(p.numel() for p in model.parameters())
    assert 0.49 <= share <= 0.51


def test_backward_collectives_are_the_megatron_ones():
    """Per decoder layer: the forward's two all_reduces (attention and MLP outputs) have identity
    backward, and the layer's input reaches its two column-parallel regions through reduce_gradient."""
    module = _program("llama", 2).lockstep_modules()[0]
    reduces = [n for n in module.graph.nodes if n.target is training_collectives.reduce_partial]
    gradients = [n for n in module.graph.nodes if n.target is training_collectives.reduce_gradient]
    layers = tiny_model("llama").config.num_hidden_layers
    # + the vocab-parallel embedding's all_reduce
    assert len(reduces) == 2 * layers + 1
    assert {n.meta[COLLECTIVE] for n in reduces} and all(n.args[1] == collectives.SIMULATED_GROUP for n in gradients)
    assert len({n.args[0] for n in gradients}) >= 2 * layers  # the normed inputs of attention and MLP


def test_whole_state_puts_trained_weights_back_by_hf_name():
    model = tiny_model("phi3")  # q|k|v pieces of unequal size, cut apart: they go back into qkv_proj
    program = fxtp.compile(model, 3, training=True)
    weights = whole_state(program, [dict(m.named_parameters()) for m in program.lockstep_modules()])
    for name, p in model.named_parameters():
        assert torch.equal(weights[name], p), name
    with pytest.raises(ValueError, match="all 3 ranks"):
        whole_state(program, [{}])


def test_training_programs_refuse_inference_uses_and_other_models():
    program = _program("llama", 2)
    with pytest.raises(TypeError, match="training=True"):
        program.generate(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="causal LMs"):
        fxtp.compile(tiny_model("t5"), 2, training=True)
    with pytest.raises(TypeError, match="plain nn.Module"):
        fxtp.compile(torch.nn.Linear(4, 4), 2, training=True, example_inputs=(torch.ones(2, 4),))
    with pytest.raises(TypeError, match="True or False"):
        fxtp.compile(tiny_model("llama"), 2, training="yes")


def _reference_steps(steps: int, dp: int = 1) -> tuple[list, list]:
    """(losses, gradient norms) of `steps` AdamW steps with clip_grad_norm_(0.5) of the unsharded tiny Llama,
    each step's batch split in `dp` parts as data-parallel ranks split it: the loss is the mean of the parts'
    losses, whose gradient data parallelism computes."""
    model = tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, norms = [], []
    for step in range(steps):
        ids, mask, labels = training_batch(batch=2 * dp, seed=step)
        loss = sum(model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
                   for rows in (slice(2 * d, 2 * d + 2) for d in range(dp))) / dp
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, norms


def _train_on_rank(rank: int, steps: int, dp: int, save_at: int, load_from: str) -> dict:
    """Steps of AdamW with clip_grad_norm_ on a DP x TP mesh (FSDP2 over dp when dp > 1), this rank's
    DTensor parameters; with `save_at` the model and optimizer are saved with torch.distributed.checkpoint
    after that many steps into `load_from`, else with `load_from` they are loaded from it before the
    first step (counted from save_at)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dp, dist.get_world_size() // dp), mesh_dim_names=("dp", "tp"))
    program = fxtp.compile(tiny_model("llama"), mesh["tp"].size(), training=True)
    module = program.dtensor_module(mesh["tp"])
    if dp > 1:
        fully_shard(module, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    first = 0
    if load_from and not save_at:
        model_state, optimizer_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=load_from)
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        first = int(load_from.rsplit("-", 1)[1])
    losses, norms = [], []
    for step in range(first, steps):
        ids, mask, labels = training_batch(batch=2 * dp, seed=step)
        rows = slice(2 * mesh.get_local_rank("dp"), 2 * mesh.get_local_rank("dp") + 2)
        loss, _ = module(ids[rows], mask[rows], labels[rows])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        norms.append(norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item())
        if save_at and step + 1 == save_at:
            model_state, optimizer_state = get_state_dict(module, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=load_from)
    return dict(losses=losses, norms=norms)


def test_adamw_with_clipping_on_two_gloo_processes_tracks_one_process(tmp_path):
    """20 steps of AdamW and torch's clip_grad_norm_ at TP=2 on real processes, on DTensor parameters: the
    global gradient norm and every step's loss equal the unsharded model's within 1e-5. Saved with
    torch.distributed.checkpoint after step 10 and loaded by new processes, steps 11-20 are bit-identical."""
    steps, checkpoint = 20, str(tmp_path / "step-10")
    expected_losses, expected_norms = _reference_steps(steps)
    results = run_ranks(_train_on_rank, 2, steps, 1, 10, checkpoint, timeout=300)
    for result in results:
        assert max(abs(a - b) for a, b in zip(result["losses"], expected_losses)) <= 1e-5
        assert max(abs(a - b) for a, b in zip(result["norms"], expected_norms)) <= 1e-5 * max(expected_norms)
    resumed = run_ranks(_train_on_rank, 2, steps, 1, 0, checkpoint, timeout=300)
    assert [r["losses"] for r in resumed] == [r["losses"][10:] for r in results]


@SLOW
def test_fsdp2_over_data_parallel_times_tensor_parallel_tracks_one_process():
    """DP=2 x TP=2 on 4 gloo processes: FSDP2's fully_shard over the data-parallel dim of fxtp's DTensor
    parameters; the mean of the two data-parallel halves' losses and the global norm equal the unsharded
    model's on the whole batch at every step."""
    steps = 20
    expected_losses, expected_norms = _reference_steps(steps, dp=2)
    results = run_ranks(_train_on_rank, 4, steps, 2, 0, "", timeout=600)
    mean = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[2]["losses"])]
    assert max(abs(a - b) for a, b in zip(mean, expected_losses)) <= 1e-5
    for result in results:
        assert max(abs(a - b) for a, b in zip(result["norms"], expected_norms)) <= 1e-5 * max(expected_norms)


def test_which_layouts_dtensor_placements_express():
    from fxtp.runtime.dtensor_module import chunk_compatible
    from fxtp.sharding.layouts import Replicate, Shard
    assert chunk_compatible(Replicate())
    assert chunk_compatible(Shard(0, (2, 2), 16))          # 4 heads of 16 over 2 ranks: torch.chunk's split
    assert not chunk_compatible(Shard(0, (2, 1, 1), 16))   # 4 heads over 3 ranks: chunk splits 22, 22, 20
    assert not chunk_compatible(Shard(1, (1, 1), 64, 3))   # GPT-2's fused q|k|v blocks
    with pytest.raises(TypeError, match="training=True"):
        fxtp.compile(tiny_model("llama"), 1).dtensor_module(None)


def test_uneven_heads_are_refused_as_dtensors():
    """3 ranks over 4 heads: parts of other sizes than DTensor's; the error says what to use instead."""
    from fxtp.runtime.dtensor_module import DTensorRankModule
    program = _program("llama", 3)
    with pytest.raises(ValueError, match="divides the heads.*tp.module"):
        DTensorRankModule(program.rank_graph(0), state_layouts(program.graph), None)


def _blocked_state_dict_on_rank(rank: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    module = fxtp.compile(tiny_model("gpt2"), 2, training=True).dtensor_module(init_device_mesh("cpu", (2,)))
    try:
        module.state_dict()
    except ValueError as e:
        return str(e)
    return ""


@SLOW
def test_fused_blocks_refuse_a_checkpoint_by_dtensor():
    """GPT-2's c_attn holds q|k|v as blocks, each rank a part of each: state_dict() refuses, naming it."""
    for message in run_ranks(_blocked_state_dict_on_rank, 2, timeout=300):
        assert "c_attn" in message and "whole_state" in message


def _seeded_step_on_rank(rank: int, seeds: tuple) -> str:
    module = fxtp.compile(tiny_model("gpt2"), 2, training=True).module(rank)  # tiny_model seeds with 0
    torch.manual_seed(seeds[rank])
    try:
        module(*training_batch())
    except RanksDisagree as e:
        return str(e)
    return ""


def test_ranks_seeded_differently_are_stopped_before_dropout():
    """GPT-2 has dropout: ranks whose generators differ would drop different parts of replicated values,
    a wrong step without an error; the rank module refuses it on every rank (seeded alike, they run:
    test_fused_blocks_refuse_a_checkpoint_by_dtensor and the training benchmarks' processes)."""
    refused = run_ranks(_seeded_step_on_rank, 2, (0, 1), timeout=300)
    assert all("random generator state" in message for message in refused)


def test_one_rank_trains_on_its_own_process():
    """At world size 1 the module needs no process group: the loss is ATen's, and equals HF's."""
    model = tiny_model("llama")
    module = _program("llama", 1).module(0)
    ids, mask, labels = training_batch()
    loss, logits = module(ids, mask, labels)
    assert abs(loss.item() - model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()) <= 1e-6
    assert logits.shape[-1] == model.config.vocab_size


def test_a_model_on_meta_trains_from_its_checkpoint(tmp_path):
    """Planned on meta, each rank's trainable shards read from the safetensors checkpoint alone."""
    from transformers import AutoModelForCausalLM
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        on_meta = AutoModelForCausalLM.from_config(model.config)
    program = fxtp.compile(on_meta, 2, training=True)
    ids, mask, labels = training_batch()
    losses = [out[0] for out in program.simulate_ranks(ids, mask, labels, checkpoint=str(tmp_path))]
    torch.autograd.backward(losses)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert all(abs(loss.item() - expected) <= 1e-6 for loss in losses)
    modules = program.lockstep_modules(checkpoint=str(tmp_path))
    assert all(p.grad is not None for m in modules for p in m.parameters())


@pytest.mark.parametrize("model_type, layer", [("mamba", "selective scan"), ("qwen3_5_text", "gated delta rule")])
def test_recurrent_layers_are_refused_for_training(model_type, layer):
    """fxtp's one-op recurrences have no backward: a clear refusal at compile, not an autograd error at
    the first backward."""
    from transformers import AutoModelForCausalLM

    from fxtp.capture.export import CaptureError
    from fxtp.tiny_configs import generic_tiny_config

    model = AutoModelForCausalLM.from_config(generic_tiny_config(model_type), dtype=torch.float32)
    with pytest.raises(CaptureError, match=f"recurrent layers .*{layer}.* no backward yet: training=True cannot"):
        fxtp.compile(model, 2, training=True)
