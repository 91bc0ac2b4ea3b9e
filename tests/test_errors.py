"""Bad input gets an error that says what happened and what to do."""
import pytest
import torch
from transformers import AutoModel

import fxtp
from fxtp.capture.export import CaptureError
from fxtp.tiny_configs import tiny_config, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=1)


@pytest.fixture(scope="module")
def tp(llama):
    return fxtp.compile(llama, 2)


@pytest.mark.parametrize("world_size", [0, -1, 2.0, True, "2"])
def test_world_size_must_be_positive_int(llama, world_size):
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        fxtp.compile(llama, world_size)


def test_world_size_larger_than_heads(llama):
    with pytest.raises(ValueError, match=r"larger than the model's 4 attention heads.*world_size <= 4"):
        fxtp.compile(llama, 5)


def test_not_a_causal_lm():
    base = AutoModel.from_config(tiny_config("llama", layers=1))
    with pytest.raises(TypeError, match=r"causal LMs \(AutoModelForCausalLM\).*\(AutoModelForSeq2SeqLM\).*"
                                        r"AutoModelForSequenceClassification"):
        fxtp.compile(base, 2)  # a decoder without its LM head is none of the supported kinds
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fxtp.compile("meta-llama/Llama-3-8B", 2)


def test_export_failure_is_wrapped(monkeypatch):
    model = tiny_model("llama", layers=1)
    forward = model.forward

    def data_dependent(input_ids=None, **kwargs):
        if input_ids.sum() > 0:  # branching on values: torch.export cannot capture this
            return forward(input_ids=input_ids, **kwargs)
        return forward(input_ids=input_ids + 1, **kwargs)

    monkeypatch.setattr(model, "forward", data_dependent)
    with pytest.raises(CaptureError, match="torch.export could not capture") as info:
        fxtp.compile(model, 2)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("bad, message", [
    (lambda ids: ids.float(), "integer tensor"),
    (lambda ids: ids[0], r"shape \[batch, seq\]"),
    (lambda ids: ids.to(torch.bool), "integer tensor"),
])
def test_bad_input_ids(tp, bad, message):
    ids = torch.randint(1, 256, (2, 5))
    with pytest.raises(ValueError, match=message):
        tp.simulate(bad(ids))


def test_bad_attention_mask(tp):
    ids = torch.randint(1, 256, (2, 5))
    with pytest.raises(ValueError, match="shape of input_ids"):
        tp.simulate(ids, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="0/1 integers or bools"):
        tp.simulate(ids, torch.ones(2, 5))


def test_inputs_on_the_wrong_device(tp):
    gm = tp.rank_graph(0)
    with pytest.raises(ValueError, match=r"move the inputs with \.to"):
        gm(torch.randint(1, 256, (2, 5), device="meta"))


def test_bad_rank(tp):
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        tp.rank_graph(2)


def test_meta_model_has_no_weights_to_run():
    with torch.device("meta"):
        model = tiny_model("llama", layers=1)
    tp = fxtp.compile(model, 2)
    with pytest.raises(ValueError, match="meta device"):
        tp.rank_graph(0)


@pytest.mark.parametrize("ids, error, message", [
    (torch.zeros(0, 4, dtype=torch.long), ValueError, r"input_ids is empty \(shape \(0, 4\)\)"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"input_ids is empty \(shape \(2, 0\)\)"),
    ([[1, 2, 3]], TypeError, "input_ids must be a torch.Tensor of token ids .* got list"),
    (torch.tensor([[1, 2, 3]], dtype=torch.uint8), ValueError, r"must be an integer tensor \(int64 or int32\) .* torch.uint8"),
])
def test_bad_token_ids_get_a_clear_error(ids, error, message):
    """Empty batches and sequences, Python lists and unsupported id dtypes, in simulate and generate."""
    tp = fxtp.compile(tiny_model("llama", layers=1), 2)
    with pytest.raises(error, match=message):
        tp.simulate(ids)
    with pytest.raises(error, match=message):
        tp.generate(ids, max_new_tokens=2)
