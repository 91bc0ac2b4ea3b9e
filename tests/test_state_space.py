"""State-space (Mamba) layers sharded per channel or per head (tiny configs of transformers'
defaults, simulated ranks).

A Mamba mixer's in_proj is column-parallel over its [x|z] blocks of channels, the depthwise conv,
A_log, D, dt_proj and the selective scan (fxtp::selective_scan, which keeps the sequence dynamic)
are per channel, x_proj row-parallel (its dt|B|C all-reduced) and out_proj row-parallel. Jamba's
mamba layers (with its MoE) are the same mixer. A Mamba-2 mixer's in_proj is cut into z, x, B, C
and dt (the conv over x|B|C split at the cut, passes/capture/split_channel_chains.py): z, x and dt
by heads, B and C by groups of heads where the groups divide over the ranks, the chunked scan per
head, out_proj row-parallel. Zamba's mixer is Mamba's with heads, scanned one by one: each rank runs its
heads' iterations. Bamba, Falcon-H1, GraniteMoeHybrid and Zamba2 have the Mamba-2 mixer
with one group: B and C whole, z, x and dt by heads as in Mamba-2 (z takes the unit of the heads it
gates, so the gated norm's one group is split and its mean all-reduced; Falcon-H1's µP multipliers
between in_proj and its cut are cut with it).
"""
import copy
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

import fxtp
from fxtp.capture.export import CaptureError, capture
from fxtp.node_meta import LAYOUT, STATE
from fxtp.sharding.layouts import Shard, local_numel
from fxtp.runtime.program import TPProgram
from fxtp.runtime.simulate import simulate
from fxtp.stats import OUTSIDE_LAYERS, collectives_by_layer, held_state, planned_state_bytes
from fxtp.testing import assert_equivalent
from fxtp.tiny_configs import generic_tiny_config

MAMBA_FAMILY = ("mamba", "falcon_mamba", "jamba", "mamba2")
# every type at every world size; by default each world-size class once (2, uneven 3, 4), each type once (a capture and a plan
# per world size is most of these tests' time)
DEFAULT_CASES = {("mamba", 2), ("mamba", 3), ("falcon_mamba", 3), ("jamba", 2), ("mamba2", 4)}
MAMBA2_HYBRIDS = ("bamba", "falcon_h1", "granitemoehybrid", "zamba2")
CASES = [pytest.param(t, n, marks=() if (t, n) in DEFAULT_CASES else pytest.mark.slow)  # slow: see DEFAULT_CASES
         for t in MAMBA_FAMILY for n in (2, 3, 4)]


def left_padded_batch(seq: int = 11):
    ids = torch.randint(3, 256, (3, seq), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids, mask


def tiny(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).float().eval()


@lru_cache(maxsize=None)
def _captured(model_type: str):
    model = tiny(generic_tiny_config(model_type))
    return model, capture(model)


@lru_cache(maxsize=None)
def program(model_type: str, world_size: int) -> tuple[torch.nn.Module, TPProgram]:
    """The tiny model and its program over `world_size` ranks, captured once for all world sizes."""
    model, captured = _captured(model_type)
    captured = copy.copy(captured)
    captured.graph_module = copy.deepcopy(captured.graph_module)
    return model, TPProgram(captured, world_size, "auto", model)


def largest_share(tp: TPProgram) -> float:
    """The most state bytes any rank holds, over the unsharded model's."""
    whole = sum(tp.captured.state[n.meta[STATE]].numel() * tp.captured.state[n.meta[STATE]].element_size()
                for n in held_state(tp.graph))
    return max(planned_state_bytes(tp, r) for r in range(tp.world_size)) / whole


@pytest.mark.parametrize("model_type, world_size", CASES)
def test_equivalent(model_type, world_size):
    model, tp = program(model_type, world_size)
    assert_equivalent(model, world_size, *left_padded_batch(), program=tp, atol=1e-5)


def head_bound(model_type: str, world_size: int) -> float:
    """The share the largest rank may hold: 1/N + 0.05 (0.55 at 2 ranks), or where whole heads do not
    split evenly (Mamba-2's 4 heads on 3 ranks: 2 on one), ceil(heads / N) / heads + 0.05."""
    heads = getattr(generic_tiny_config(model_type), "num_heads", 0) if model_type == "mamba2" else 0
    return max(1 / world_size, -(-heads // world_size) / heads if heads else 0) + 0.05


@pytest.mark.parametrize("model_type, world_size", CASES)
def test_state_split_over_ranks(model_type, world_size):
    _, tp = program(model_type, world_size)
    assert largest_share(tp) <= head_bound(model_type, world_size)


@pytest.mark.slow  # test_equivalent covers the Mamba-2 mixer these share; each hybrid plans slowly
@pytest.mark.parametrize("model_type", MAMBA2_HYBRIDS)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_mamba2_hybrids_equivalent(model_type, world_size):
    model, tp = program(model_type, world_size)
    assert_equivalent(model, world_size, *left_padded_batch(), program=tp, atol=1e-5)


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=() if t in ("bamba", "falcon_h1") else pytest.mark.slow)
                                        for t in MAMBA2_HYBRIDS])  # bamba: the grouped gated norm; falcon_h1: µP
def test_mamba2_hybrid_mixers_sharded(model_type):
    """At 2 ranks z, x and dt are sharded by heads and out_proj row-parallel; of in_proj only B and C (one
    group) stay whole, so a rank holds half of the rest of the parameters, within 0.03 (the conv, norms)."""
    model, tp = program(model_type, 2)
    assert_equivalent(model, 2, *left_padded_batch(), program=tp, atol=1e-5)
    state = {n.meta[STATE]: n.meta[LAYOUT] for n in held_state(tp.graph)}
    mixer = next(m for name, m in model.named_modules() if name.endswith("layers.0.mamba"))
    in_proj = {name: layout for name, layout in state.items() if ".mamba.in_proj.weight" in name}
    whole = [name for name, layout in in_proj.items() if not isinstance(layout, Shard)]
    groups, layers = mixer.n_groups * mixer.ssm_state_size, len({name.split(".mamba")[0] for name in in_proj})
    assert len(in_proj) == 5 * layers and len(whole) == 2 * layers, in_proj
    assert all(tp.captured.state[name].shape[0] == groups for name in whole), whole
    assert isinstance(state["model.layers.0.mamba.out_proj.weight"], Shard)
    parameters = dict(model.named_parameters())
    total = sum(p.numel() for p in parameters.values())
    whole_share = sum(tp.captured.state[name].numel() for name in whole) / total
    held = max(sum(local_numel(tp.captured.state[name].numel(), layout, r) for name, layout in state.items()
                   if name.split("[")[0] in parameters) for r in range(2)) / total
    assert held <= whole_share + (1 - whole_share) / 2 + 0.03, (held, whole_share)


def test_mamba2_in_proj_cut_by_heads():
    """z, x, B, C and dt are projections of their own, each sharded (4 groups of B/C over 2 ranks)."""
    _, tp = program("mamba2", 2)
    pieces = [n for n in held_state(tp.graph) if n.meta[STATE].startswith("backbone.layers.0.mixer.in_proj")]
    assert len(pieces) == 5
    assert all(isinstance(n.meta[LAYOUT], Shard) and n.meta[LAYOUT].dim == 0 for n in pieces)


def test_mamba2_from_a_checkpoint_on_meta(tmp_path):
    """in_proj's pieces (x|B|C cut out of in_proj, then cut again) are named as blocks of the stored
    in_proj, which a program compiled on meta reads from the checkpoint: the model's logits."""
    model, _ = _captured("mamba2")
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        tp = fxtp.compile(AutoModelForCausalLM.from_config(generic_tiny_config("mamba2")), 2)
    pieces = [n.meta[STATE] for n in held_state(tp.graph) if n.meta[STATE].startswith("backbone.layers.0.mixer.in_proj")]
    assert len(pieces) == 5 and all(name.count("[") == 1 for name in pieces), pieces
    ranks = [tp.rank_graph(r, device="cpu", checkpoint=str(tmp_path)) for r in range(2)]
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert max((out - expected).abs().max().item() for out in simulate(ranks, (ids, mask), {})) <= 1e-5


def test_other_sequence_lengths():
    """The scan is one op, so one program serves any length (torch.export had fixed it to 16)."""
    model, tp = program("mamba", 2)
    for seq in (1, 5, 23):
        assert_equivalent(model, 2, *left_padded_batch(seq), program=tp, atol=1e-5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_mixer_sharded_per_channel(world_size):
    """in_proj holds each rank's channels of x and of z; the conv, A_log, D and dt_proj its channels."""
    model, tp = program("mamba", world_size)
    mixer = model.backbone.layers[0].mixer
    channels = mixer.intermediate_size
    base, extra = divmod(channels, world_size)
    for r in range(world_size):
        start = r * base + min(r, extra)
        mine = slice(start, start + base + (r < extra))
        params = dict(tp.rank_graph(r).named_parameters())
        prefix = "backbone.layers.0.mixer."
        x, z = mixer.in_proj.weight[:channels], mixer.in_proj.weight[channels:]
        assert torch.equal(params[prefix + "in_proj.weight"], torch.cat([x[mine], z[mine]]))
        for name in ("conv1d.weight", "conv1d.bias", "A_log", "D", "dt_proj.weight", "dt_proj.bias"):
            assert torch.equal(params[prefix + name], mixer.get_parameter(name)[mine]), name
        assert torch.equal(params[prefix + "out_proj.weight"], mixer.out_proj.weight[:, mine])


def test_all_reduces_per_layer():
    """x_proj's dt, B and C pieces (fxtp unfuses the unequal pieces) and out_proj: 4 per layer."""
    _, tp = program("mamba", 2)
    by_layer = collectives_by_layer(tp.rank_graph(0))
    by_layer.pop(OUTSIDE_LAYERS, None)
    assert by_layer == {f"backbone.layers.{i}": {"all_reduce": 4} for i in range(2)}


def test_zamba_loop_over_heads_sharded():
    """Zamba's Mamba mixer scans head by head (a loop unrolled in the graph, each head with its own x_proj,
    dt_proj, A_log and D) and joins the heads' outputs: each rank runs the iterations of the heads it owns
    (fxtp/sharding/op_rules/on_rank.py), so in_proj is column-parallel, the per-head weights sharded by
    heads, out_proj row-parallel, one all_reduce per layer, and a rank holds about half of the parameters."""
    model, tp = program("zamba", 2)
    assert_equivalent(model, 2, *left_padded_batch(), program=tp, atol=1e-5)
    state = {n.meta[STATE]: n.meta[LAYOUT] for n in held_state(tp.graph)}
    for name in ("in_proj.weight", "x_proj_weight", "dt_proj_weight", "conv1d.weight", "out_proj.weight"):
        assert isinstance(state[f"model.layers.0.mamba.{name}"], Shard), (name, state)
    by_layer = collectives_by_layer(tp.rank_graph(0))
    by_layer.pop(OUTSIDE_LAYERS, None)
    assert by_layer == {f"model.layers.{i}": {"all_reduce": 1} for i in range(2)}
    assert largest_share(tp) <= 0.55


def test_generate_refuses_recurrent_layers():
    model, tp = program("mamba", 2)
    with pytest.raises(CaptureError, match="recurrent state"):
        tp.generate(left_padded_batch()[0], max_new_tokens=2)


@st.composite
def mixer_configs(draw):
    """A one-layer Mamba (drawn state size, expansion, conv kernel, dt rank) or Mamba-2 (drawn heads,
    groups of heads dividing them, state size, conv kernel, chunk size)."""
    hidden = draw(st.sampled_from([16, 24, 32]))
    common = dict(hidden_size=hidden, num_hidden_layers=1, vocab_size=64, state_size=draw(st.integers(1, 8)),
                  expand=draw(st.integers(1, 3)), conv_kernel=draw(st.integers(2, 5)),
                  use_conv_bias=draw(st.booleans()), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if draw(st.booleans()):
        return AutoConfig.for_model("mamba", time_step_rank=draw(st.integers(1, 6)), **common)
    heads = draw(st.sampled_from([h for h in (2, 3, 4, 6, 8) if hidden * common["expand"] % h == 0]))
    return AutoConfig.for_model(
        "mamba2", num_heads=heads, head_dim=hidden * common["expand"] // heads,
        n_groups=draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0])),
        # chunks shorter than the sequence, 4 and 8 dividing capture's default example length (16): HF cuts the
        # padding to whole chunks off under `if pad_size > 0`, so capture takes an example no chunk divides
        chunk_size=draw(st.sampled_from([3, 4, 5, 6, 7, 8])), **common)


def check_mixer(config, world_size, seq):
    assume(world_size <= getattr(config, "num_heads", world_size))  # fxtp refuses more ranks than heads
    model = tiny(config)
    ids = torch.randint(3, 64, (2, seq), generator=torch.Generator().manual_seed(seq))
    tp = fxtp.compile(model, world_size)
    assert_equivalent(model, world_size, ids, torch.ones_like(ids), program=tp, atol=1e-5)
    if world_size > 1 and config.model_type == "mamba":  # the mixer's channels are split whatever their count
        assert largest_share(tp) < 1 / world_size + 0.15


def test_a_chunk_dividing_the_example_length_serves_every_length():
    """Mamba-2 with chunks of 8: an example of 16 tokens would capture no cut of the chunk padding."""
    config = generic_tiny_config("mamba2")
    config.chunk_size = 8
    tp = fxtp.compile(tiny(config), 2)
    for seq in (5, 16, 19):
        ids = torch.randint(3, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        assert_equivalent(tp.model, 2, ids, torch.ones_like(ids), program=tp, atol=1e-5)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixer_configs(), st.integers(1, 4), st.integers(1, 9))
def test_random_mixers(config, world_size, seq):
    check_mixer(config, world_size, seq)


@pytest.mark.slow  # more draws of test_random_mixers
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixer_configs(), st.integers(1, 4), st.integers(1, 9))
def test_random_mixers_more(config, world_size, seq):
    check_mixer(config, world_size, seq)
