"""generic_tiny_config shrinks any model type's default config (the model-type sweep uses it)."""
import pytest
import torch
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
