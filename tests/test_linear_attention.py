"""Linear-attention hybrids sharded by heads (tiny configs of transformers' defaults, simulated ranks).

Qwen3-Next's gated delta net, Kimi Linear's delta attention, the Bailing hybrid's and OLMo hybrid's
linear attention all join their q, k and v for one depthwise conv and cut them apart after it. The
conv is split at that cut (passes/capture/split_channel_chains.py), so q, k and v each keep their
heads' shard: the projections are column-parallel by (key-)heads, the conv (its weight cut alike) and
the delta rule per head, out_proj row-parallel. Qwen3-Next cuts q, k, v and z out of one in_proj_qkvz per key-head
group, so its rows are sharded by those groups.
"""
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from fxtp.capture.export import capture
from fxtp.node_meta import LAYOUT, STATE
from fxtp.sharding.layouts import Shard, local_numel
from fxtp.stats import held_state
from fxtp.testing import assert_equivalent, program_of_capture
from fxtp.tiny_configs import generic_tiny_config

# qwen3_next at 2 and uneven 3 ranks by default; the other types' mixers are the same pattern (slow)
DEFAULT_CASES = {("qwen3_next", 2), ("qwen3_next", 3)}
CASES = [pytest.param(t, n, marks=[*(() if (t, n) in DEFAULT_CASES else [pytest.mark.slow]),
                                   *(() if t in CONFIG_MAPPING_NAMES else [pytest.mark.skip(reason=f"no {t} here")])])
         for t in ("qwen3_next", "kimi_linear", "bailing_hybrid", "olmo_hybrid") for n in (2, 3, 4)]
# Kimi's b_proj (one value per each of 32 heads) is planned with the low-rank gate projections f_a and
# g_a, all units of one feature, and the 32 do not divide over 3 ranks as their 128 do: kept whole
KEPT_WHOLE = {("kimi_linear", 3): ".b_proj.weight"}


def left_padded_batch(seq: int = 11):
    ids = torch.randint(3, 256, (3, seq), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


@lru_cache(maxsize=None)
def _captured(model_type: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_tiny_config(model_type), dtype=torch.float32).eval()
    return model, capture(model)


def mixer_weights(model: torch.nn.Module) -> list[str]:
    """The weights of the linear layers and of the conv of every linear-attention mixer (a module with a
    depthwise conv1d)."""
    mixers = [name for name, m in model.named_modules()
              if isinstance(getattr(m, "conv1d", None), torch.nn.Conv1d) and m.conv1d.groups == m.conv1d.in_channels]
    return [f"{name}.weight" for name, m in model.named_modules() if any(name.startswith(mixer + ".") for mixer in mixers)
            and (isinstance(m, torch.nn.Linear) or name.endswith(".conv1d"))]


def largest_parameter_share(tp, model: torch.nn.Module) -> float:
    """The most parameter elements a rank holds over the model's (blocks cut out of a parameter count as it)."""
    parameters = dict(model.named_parameters())
    held = [n for n in held_state(tp.graph) if n.meta[STATE].split("[")[0] in parameters]
    return max(sum(local_numel(tp.captured.state[n.meta[STATE]].numel(), n.meta[LAYOUT], r) for n in held)
               for r in range(tp.world_size)) / sum(p.numel() for p in parameters.values())


@pytest.mark.parametrize("model_type, world_size", CASES)
def test_mixers_sharded_by_heads(model_type, world_size):
    """Exact; every projection of the mixers and their conv's weight sharded but those of KEPT_WHOLE; a rank holds at most 1/N + 0.05
    of the parameters, or where the 4 attention heads do not divide, ceil(4 / N) / 4 + 0.05."""
    model, captured = _captured(model_type)
    tp = program_of_capture(captured, world_size, model)
    assert_equivalent(model, world_size, *left_padded_batch(), program=tp, atol=1e-5)
    layouts = {n.meta[STATE]: n.meta[LAYOUT] for n in held_state(tp.graph)}
    weights = mixer_weights(model)
    assert weights
    for name in (w for w in weights if not w.endswith(KEPT_WHOLE.get((model_type, world_size), "-"))):
        pieces = [layout for state, layout in layouts.items() if state.split("[")[0] == name]
        assert pieces and all(isinstance(layout, Shard) for layout in pieces), (name, pieces)
    assert largest_parameter_share(tp, model) <= max(1 / world_size, -(-4 // world_size) / 4) + 0.05


@st.composite
def gated_delta_configs(draw):
    """A Qwen3-Next of two layers (linear attention then full, or both linear) with drawn key heads, value
    heads per key head, key and value head sizes and conv kernel."""
    key_heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    config = generic_tiny_config("qwen3_next").to_dict()
    del config["model_type"]
    return AutoConfig.for_model(
        "qwen3_next", **{**config,
                         "linear_num_key_heads": key_heads,
                         "linear_num_value_heads": key_heads * draw(st.sampled_from([1, 2, 3])),
                         "linear_key_head_dim": draw(st.sampled_from([4, 8, 16])),
                         "linear_value_head_dim": draw(st.sampled_from([4, 8, 16])),
                         "linear_conv_kernel_dim": draw(st.integers(2, 4)),
                         "layer_types": draw(st.sampled_from([["linear_attention", "full_attention"],
                                                              ["linear_attention"] * 2]))})


def check_gated_delta(config, world_size, seq):
    assume(world_size <= config.linear_num_key_heads)  # fxtp splits between key-head groups, never inside one
    torch.manual_seed(seq)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert_equivalent(model, world_size, *left_padded_batch(seq), atol=1e-5)


needs_qwen3_next = pytest.mark.skipif("qwen3_next" not in CONFIG_MAPPING_NAMES, reason="no qwen3_next here")


@needs_qwen3_next
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gated_delta_configs(), st.integers(1, 4), st.integers(5, 13))
def test_random_gated_delta_nets(config, world_size, seq):
    check_gated_delta(config, world_size, seq)


@needs_qwen3_next
@pytest.mark.slow  # more draws of test_random_gated_delta_nets
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gated_delta_configs(), st.integers(1, 4), st.integers(5, 13))
def test_random_gated_delta_nets_more(config, world_size, seq):
    check_gated_delta(config, world_size, seq)
