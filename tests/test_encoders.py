"""Encoder-decoder (T5, mT5, BART, Marian) and encoder models (BERT family): exact at world sizes
1, 2, 4 with padding, collectives per layer, and DeepSpeed's T5 injection_policy."""
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification
from transformers.models.t5.modeling_t5 import T5Block

import fxtp
from fxtp.tiny_configs import ENCODERS, SEQ2SEQ_LMS, generic_tiny_config, tiny_model
from fxtp.sharding.layouts import Replicate, Shard
from fxtp.stats import OUTSIDE_LAYERS, collectives_by_layer, in_layer
from fxtp.testing import assert_equivalent, padded_batch, tiny_program


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("arch", SEQ2SEQ_LMS + ENCODERS)
def test_exact_with_padding(arch, world_size):
    model, tp = tiny_program(arch, world_size)
    assert_equivalent(model, world_size, **padded_batch(model, seq=11), program=tp)


@pytest.mark.parametrize("arch", SEQ2SEQ_LMS + ENCODERS)
def test_all_reduce_per_layer(arch):
    """Self-attention, cross-attention (decoder only) and FFN: one all_reduce each. Outside the
    layers only the embeddings' all_reduce (encoder and decoder lookups) and the logits' all_gather."""
    _, tp = tiny_program(arch, 2)
    found = {layer: dict(c) for layer, c in collectives_by_layer(tp.rank_graph(0)).items()}
    lookups = 2 if arch in SEQ2SEQ_LMS else 1
    assert found.pop(OUTSIDE_LAYERS) == {"all_reduce": lookups, "all_gather": 1}
    expected = {layer: {"all_reduce": 2 + (".decoder." in f".{layer}")} for layer in found}
    assert len(found) == (4 if arch in SEQ2SEQ_LMS else 2) and found == expected, found


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForSequenceClassification])
def test_encoder_heads(auto_class):
    """The base model returns its hidden states, a classifier its logits; token types optional."""
    model = tiny_model("bert", auto_class=auto_class)
    tp = fxtp.compile(model, 2)
    batch = padded_batch(model, seq=11)
    assert_equivalent(model, 2, **batch, program=tp)
    del batch["token_type_ids"]
    assert_equivalent(model, 2, **batch, program=tp)


def test_t5_relative_position_bias_is_sliced_by_head():
    """The bias (relative positions + mask, [batch, heads, q, k]) is computed replicated and every
    attention reads its own heads of it: a local slice, no collective."""
    _, tp = tiny_program("t5", 2)
    attention = [n for n in tp.graph.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(attention) == 6  # self-attention of 2 encoder and 2 decoder blocks, 2 cross-attentions
    for node in attention:
        bias = node.args[3]
        assert bias.meta["val"].shape[1] == 4 and bias.meta["fxtp.layout"] == Replicate()
        assert node.meta["fxtp.layout"] == node.meta["fxtp.wants"][bias] == Shard(1, (2, 2))


def test_deepspeed_t5_injection_policy_matches_the_automatic_plan():
    model, automatic = tiny_program("t5", 2)
    manual = fxtp.compile(model, 2, injection_policy={T5Block: ("SelfAttention.o", "EncDecAttention.o",
                                                                "DenseReluDense.wo")})

    def layer_layouts(tp):
        return {n.meta["fxtp.state"]: n.meta["fxtp.layout"] for n in tp.graph.graph.nodes
                if "fxtp.state" in n.meta and in_layer(n.meta["fxtp.state"]) and n.users}

    assert layer_layouts(manual) == layer_layouts(automatic)
    assert_equivalent(model, 2, **padded_batch(model, seq=11), program=manual)
    dump = fxtp.dump(manual)
    assert "row-parallel     decoder.block.1.layer.1.EncDecAttention.o.weight" in dump
    assert "collectives in decoder.block.1: all_reduce x3" in dump


@pytest.mark.parametrize("arch", ["t5", "bert"])
def test_rank_module_takes_the_inputs_by_name(arch):
    """A rank's GraphModule is called like the model: optional inputs default to None (filled)."""
    model, tp = tiny_program(arch, 1)
    batch = padded_batch(model, seq=11)
    gm = tp.module(0)
    with torch.no_grad():
        torch.testing.assert_close(gm(**batch), model(**batch)[0], rtol=0, atol=1e-5)
        del batch["attention_mask"]
        torch.testing.assert_close(gm(**batch), model(**batch)[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="must be an integer tensor"):
        gm(batch["input_ids"], decoder_input_ids=batch["input_ids"].float()) if arch == "t5" \
            else gm(batch["input_ids"].float())


def test_token_types_are_read_only_where_the_model_has_a_vocabulary_of_them():
    """XLM (a masked LM without type_vocab_size) adds its word embedding of any token type ids it is
    given, so ids of zeros are not its default: the program takes none and refuses them, naming them."""
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(generic_tiny_config("xlm")).eval()
    tp = fxtp.compile(model, 2)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_equivalent(model, 2, ids, torch.ones_like(ids), program=tp, atol=1e-5)
    with pytest.raises((TypeError, ValueError), match="token_type_ids"):
        tp.simulate(ids, torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
