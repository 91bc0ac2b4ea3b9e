"""`fxtp dump DIR`: a HF config's model built on the meta device, of the class its `architectures`
names (else of its kind), for causal LMs, seq2seq LMs and encoders, with no remote code."""
import builtins
import json

import pytest
import torch
from transformers import AutoConfig, BertForMaskedLM, LlamaForCausalLM, T5ForConditionalGeneration

from fxtp.cli import UsageError, build_model, main, model_class
from fxtp.tiny_configs import real_config, tiny_config


def dump_output(argv, capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


# T5: slow; by default test_dump_meta.py's T5 dump on meta equals its dump with weights at 3 ranks, and
# test_t5_config_directory_dumps_its_decode_step_on_meta dumps a T5 config directory
@pytest.mark.parametrize("arch, architectures", [
    pytest.param("t5", ["T5ForConditionalGeneration"], marks=pytest.mark.slow),
    ("bert", ["BertForMaskedLM"]),
    ("bert", None),  # no class named: the masked LM of an encoder's kind, not the causal BertLMHeadModel
])
def test_config_directory_dumps_like_the_tiny_model(arch, architectures, tmp_path, capsys):
    """The tiny name builds the model with weights, the directory on meta: the same plan and text."""
    config = tiny_config(arch)
    config.architectures = architectures
    config.save_pretrained(tmp_path)
    from_directory = dump_output(["dump", str(tmp_path), "--world-size", "3"], capsys)
    assert from_directory == dump_output(["dump", arch, "--world-size", "3"], capsys)
    assert "state bytes on rank 2:" in from_directory


@pytest.mark.parametrize("arch, expected", [("t5", T5ForConditionalGeneration), ("bert", BertForMaskedLM),
                                            ("llama", LlamaForCausalLM)])
def test_class_by_kind_where_the_config_names_none(arch, expected):
    assert model_class(tiny_config(arch), arch) is expected


def test_model_is_built_on_meta_in_the_configs_dtype(tmp_path):
    """A 70B-wide layer would take gigabytes: on meta it takes nothing, in the dtype the config names."""
    config = real_config("llama3-70b", layers=1)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(tmp_path)
    model = build_model(str(tmp_path))
    assert type(model) is LlamaForCausalLM and not model.training
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_big_config_dumps_every_rank(tmp_path, capsys):
    config = real_config("llama3-70b", layers=1)
    config.save_pretrained(tmp_path)
    text = dump_output(["dump", str(tmp_path / "config.json"), "--world-size", "8", "--rank", "7"], capsys)
    assert len([line for line in text.splitlines() if line.startswith("  state bytes on rank")]) == 8
    assert "collectives in model.layers.0: all_reduce x2" in text


def test_unknown_class_is_named(tmp_path, capsys):
    config = tiny_config("llama")
    config.architectures = ["LlamaForSomethingNew"]
    config.save_pretrained(tmp_path)
    assert main(["dump", str(tmp_path), "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "LlamaForSomethingNew" in err and "transformers" in err


def test_remote_code_is_refused_without_a_prompt(tmp_path, capsys, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "fxtp_test_remote", "architectures": ["RemoteForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig"}}))

    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *args: prompts.append(args) or "n")  # transformers asks with input()
    assert main(["dump", str(tmp_path), "--world-size", "2"]) == 2
    assert prompts == []
    assert "could not read a HF config" in capsys.readouterr().err


def test_bad_rank_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["dump", "llama", "--world-size", "2", "--rank", "x"])
    assert main(["dump", "llama", "--world-size", "2", "--rank", "2"]) == 2


def test_no_class_for_the_kind():
    with pytest.raises(UsageError, match="no causal LM class for model type 'vit'.*architectures"):
        model_class(AutoConfig.for_model("vit"), "vit")


@pytest.mark.parametrize("arch", ["t5", pytest.param("bart", marks=pytest.mark.slow)])  # bart's step: T5's path
def test_seq2seq_config_directory_dumps_its_decode_step_on_meta(arch, tmp_path, capsys):
    """--decode plans the decoder step with its sharded self-attention cache, without weights (BART's
    decoder reads its mask's values unless given a 4-D one)."""
    tiny_config(arch).save_pretrained(tmp_path)
    from_directory = dump_output(["dump", str(tmp_path), "--world-size", "2", "--decode"], capsys)
    with_weights = dump_output(["dump", arch, "--world-size", "2", "--decode"], capsys)

    def cache_lines(text: str) -> list[str]:  # the cache's layouts; the graphs differ in how constants are lifted
        return [line for line in text.splitlines() if "kv_cache." in line and "aten." not in line]
    assert cache_lines(from_directory) == cache_lines(with_weights) and len(cache_lines(with_weights)) >= 4
