"""generic_tiny_config shrinks any model type's default config (the model-type sweep uses it)."""
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from fxtp.tiny_configs import generic_tiny_config


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gemma3_text"])
def test_generic_tiny_config_builds_a_tiny_model(model_type):
    config = generic_tiny_config(model_type)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (64, 2, 4, 256)
    assert len(getattr(config, "layer_types", None) or [None] * 2) == 2  # per-layer lists cut to the layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False).logits
    assert logits.shape == (1, 3, 256)


def test_expert_sizes_and_token_ids_shrink():
    config = generic_tiny_config("qwen3_moe")
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 48)
    assert all(i is None or i < 256 for i in (config.pad_token_id, config.bos_token_id, config.eos_token_id))


# model types whose defaults the generic shrinking alone left unbuildable (fxtp.tiny_configs._TYPE_FIXES; ernie4_5_moe's
# top-k `moe_k`; head_dim or kv heads left None; per-layer dicts by layer index); gemma4_assistant builds but runs only
# beside its target model
FIXED_TYPES = ("dbrx", "deepseek_v2", "dots1", "zaya", "lfm2_moe", "olmo_hybrid", "gemma3n_text", "cohere_compass_text",
               "dots3_note_text", "ernie4_5_moe", "blt", "hunyuan_v1_moe", "ministral", "nemotron", "gemma4_text")


def installed(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    return model_type in CONFIG_MAPPING


@pytest.mark.parametrize("model_type", FIXED_TYPES)
def test_fixed_types_build_and_run(model_type):
    if not installed(model_type):
        pytest.skip(f"{model_type} is not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_tiny_config(model_type), dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # no size left at its default
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and logits.isfinite().all()


def test_gemma4_assistant_config_builds():
    """Its default text config fails its own validation (per-layer inputs must be 0 for an assistant)."""
    assert generic_tiny_config("gemma4_assistant").text_config.hidden_size_per_layer_input == 0


# at N=2, exact; the share of state each rank holds where the plan reaches <= 0.55 (the others keep
# recurrent mixers, MLA's low-rank projections or AltUp/LAuReL replicated: benchmarks/results/model_types_sweep.md)
HALVED = {"dots1", "cohere_compass_text", "dots3_note_text", "ernie4_5_moe"}


@pytest.mark.slow
# dbrx: refused (tests/test_moe_loops.py); blt: its entropy patching sizes patches from the data
@pytest.mark.parametrize("model_type", [t for t in FIXED_TYPES if t not in ("dbrx", "blt")])
def test_fixed_types_exact_at_two_ranks(model_type):
    if not installed(model_type):
        pytest.skip(f"{model_type} is not in transformers {transformers.__version__}")
    import fxtp
    from fxtp.stats import planned_state_bytes
    from fxtp.testing import assert_equivalent
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_tiny_config(model_type), dtype=torch.float32).float().eval()
    ids = torch.randint(3, 256, (3, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    tp = fxtp.compile(model, 2)
    assert_equivalent(model, 2, ids, mask, program=tp, atol=1e-5)
    total = sum(t.numel() * t.element_size() for t in tp.captured.state.values())
    if model_type in HALVED:
        assert all(planned_state_bytes(tp, r) / total <= 0.55 for r in range(2))
