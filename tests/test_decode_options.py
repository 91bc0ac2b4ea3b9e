"""fxtp/decode/options.py: the compiled decode step's typed options. Defaults by world size and by
whether symmetric memory works, chosen in `resolve`; every value checked where a DecodeOptions is
made; `compile=` as True, a dict of fields or a DecodeOptions, an unknown key naming the closest
field; the inductor options the decode step and the prefill get. Nothing here touches a GPU."""
import dataclasses

import pytest
import torch

import fxtp
from fxtp.decode.options import DecodeOptions, decode_options, requested, resolve
from fxtp.passes.decode.store_gemv_inputs import StoreGemvInputs

ON_BY_DEFAULT = ("pdl", "decode_attention", "merge_projections", "gemv", "gated_gemv", "rotary_gemv", "gemv_preload")


@pytest.mark.parametrize("world_size, symmetric_memory", [(1, False), (1, True), (2, False), (2, True), (4, True)])
def test_defaults_by_world_size_and_symmetric_memory(world_size, symmetric_memory):
    """Symmetric-memory all_reduces (one-shot, push, push's norm) only with more than one rank where
    symmetric memory works; inductor's coordinate descent tuning only with more than one rank."""
    options = resolve(DecodeOptions(), world_size, symmetric_memory)
    several = world_size > 1
    assert options.unresolved() == []
    assert (options.one_shot_all_reduce, options.push_all_reduce, options.push_norm) == (several and symmetric_memory,) * 3
    assert options.coordinate_descent_tuning is several and options.store_gemv_inputs is True
    assert all(getattr(options, name) is True for name in ON_BY_DEFAULT)
    assert (options.gemv_push, options.gemv_prefetch_bytes, options.gemv_blocks, options.inductor) == (False, 0, {}, {})


def test_explicit_choices_win_and_the_defaults_that_follow_them_follow():
    assert DecodeOptions().unresolved() == ["coordinate_descent_tuning", "one_shot_all_reduce", "push_all_reduce",
                                            "push_norm", "store_gemv_inputs"]
    nccl = resolve(DecodeOptions(one_shot_all_reduce=False), 2, True)  # push needs what one-shot does: NCCL throughout
    assert (nccl.one_shot_all_reduce, nccl.push_all_reduce, nccl.push_norm) == (False, False, False)
    one_shot = resolve(DecodeOptions(push_all_reduce=False), 2, True)
    assert (one_shot.one_shot_all_reduce, one_shot.push_all_reduce, one_shot.push_norm) == (True, False, False)
    unnormed = resolve(DecodeOptions(push_norm=False), 2, True)
    assert (unnormed.push_all_reduce, unnormed.push_norm) == (True, False)
    assert resolve(DecodeOptions(coordinate_descent_tuning=True), 1, False).coordinate_descent_tuning is True
    assert resolve(DecodeOptions(coordinate_descent_tuning=False), 2, True).coordinate_descent_tuning is False
    assert resolve(DecodeOptions(one_shot_all_reduce=True), 1, False).one_shot_all_reduce is True  # no collectives
    users_pass = StoreGemvInputs()  # the user's own post-grad pass takes the place of store_gemv_inputs
    assert resolve(DecodeOptions(inductor={"post_grad_custom_post_pass": users_pass}), 1, False).store_gemv_inputs is False


@pytest.mark.parametrize("name", ["one_shot_all_reduce", "push_all_reduce"])
def test_symmetric_memory_all_reduces_where_it_does_not_work_are_an_error(name):
    with pytest.raises(RuntimeError, match=f"{name}=True needs symmetric memory, which does not work between these "
                                           f"ranks .*; leave {name} out to use NCCL"):
        resolve(DecodeOptions(**{name: True}), 2, symmetric_memory=False)


@pytest.mark.parametrize("fields, message", [
    ({"gemv_preload": "yes"}, r"DecodeOptions.gemv_preload is True or False, got 'yes'"),
    ({"gated_gemv": 1}, r"DecodeOptions.gated_gemv is True or False, got 1"),
    ({"gemv": 1}, r"DecodeOptions.gemv is True or False, got 1"),
    ({"coordinate_descent_tuning": 1},
     r"DecodeOptions.coordinate_descent_tuning is True or False \(or None, chosen by resolve\), got 1"),
    ({"gemv_prefetch_bytes": -1}, r"gemv_prefetch_bytes is the bytes of each weight .* 0 or more, got -1"),
    ({"gemv_prefetch_bytes": 1.5}, r"gemv_prefetch_bytes is the bytes .* got 1.5"),
    ({"gemv_prefetch_bytes": True}, r"gemv_prefetch_bytes is the bytes .* got True"),
    ({"gemv_blocks": [1, 2048, 4]}, r"gemv_blocks maps a weight's shape to block sizes"),
    ({"gemv_blocks": {"4096": [1, 2048, 4]}}, r"gemv_blocks maps .*; got '4096': \[1, 2048, 4\]"),
    ({"gemv_blocks": {"4096x2048": [3, 2048, 4]}}, r"powers of two"),
    ({"gemv_blocks": {"4096x2048": [1, 2048, 64]}}, r"num_warps at most 32"),
    ({"inductor": ["max_autotune"]}, r"DecodeOptions.inductor is a dict of inductor's options by name"),
    ({"inductor": {"triton.enable_pdl": False}}, r"inductor names 'triton.enable_pdl', which the field pdl sets: "
                                                 r"pass pdl=False instead"),
    ({"inductor": {"_collective.auto_select": True}}, r"which the field one_shot_all_reduce sets"),
    ({"store_gemv_inputs": True, "inductor": {"post_grad_custom_post_pass": StoreGemvInputs()}},
     r"store_gemv_inputs=True is inductor's post_grad_custom_post_pass, which `inductor` sets already"),
    ({"push_norm": True, "push_all_reduce": False}, r"push_norm=True fuses the norm into push all_reduce, which is off"),
    ({"gemv_push": True, "push_all_reduce": False},
     r"gemv_push=True fuses the projection before it into push all_reduce, which is off"),
])
def test_every_value_is_checked_where_the_options_are_made(fields, message):
    with pytest.raises(ValueError, match=message):
        DecodeOptions(**fields)


def test_a_default_that_conflicts_with_an_explicit_choice_fails_where_it_is_chosen():
    """push_norm=True is fine until push all_reduce resolves off (one rank, or no symmetric memory)."""
    asked = DecodeOptions(push_norm=True, gemv_push=True)
    assert resolve(asked, 2, True).push_norm is True
    with pytest.raises(ValueError, match="push_norm=True fuses the norm into push all_reduce, which is off here "
                                         r"\(push_all_reduce=False; by default it is on only with more than one rank"):
        resolve(asked, 1, False)


def test_compile_takes_true_a_dict_of_fields_or_the_options():
    assert requested(True) == DecodeOptions()
    assert requested({}) == DecodeOptions()
    assert requested({"gemv": False, "inductor": {"max_autotune": True}}) == DecodeOptions(
        gemv=False, inductor={"max_autotune": True})
    options = DecodeOptions(pdl=False)
    assert requested(options) is options
    assert fxtp.DecodeOptions is DecodeOptions and "DecodeOptions" in fxtp.__all__
    for wrong in ("max-autotune", 1, None):
        with pytest.raises(TypeError, match="compile is True, False, an fxtp.DecodeOptions or a dict of its fields"):
            requested(wrong)


@pytest.mark.parametrize("key, hint", [
    ("fxtp.gemv", "the closest field is 'gemv'"),  # the keys of the untyped options, before DecodeOptions
    ("fxtp.decode_attention", "the closest field is 'decode_attention'"),
    ("gemv_prefetch", "the closest field is 'gemv_prefetch_bytes'"),
    ("rotary", "the closest field is 'rotary_gemv'"),
    ("triton.enable_pdl", "it is the inductor option that the field 'pdl' sets"),
    ("_collective.auto_select", "it is the inductor option that the field 'one_shot_all_reduce' sets"),
    ("max_autotune", r"it is an inductor option: pass inductor=\{'max_autotune': ...\}"),
])
def test_an_unknown_key_names_the_closest_field(key, hint):
    with pytest.raises(TypeError, match=rf"DecodeOptions has no field '{key}'; {hint}\. Its fields: "
                                        r"coordinate_descent_tuning, compile_prefill, pdl, .*, inductor$"):
        requested({key: True})


def test_inductor_options_of_the_decode_step_and_of_the_prefill():
    options = resolve(DecodeOptions(inductor={"max_autotune": True}), 2, True)
    decode = options.inductor_options()
    assert isinstance(decode.pop("post_grad_custom_post_pass"), StoreGemvInputs)
    assert decode == {"coordinate_descent_tuning": True, "triton.enable_pdl": True, "_collective.auto_select": True,
                      "max_autotune": True}
    assert options.inductor_options(decode=False) == {"max_autotune": True}
    unstored = resolve(DecodeOptions(store_gemv_inputs=False, pdl=False), 1, False)
    assert unstored.inductor_options() == {"coordinate_descent_tuning": False, "triton.enable_pdl": False,
                                           "_collective.auto_select": False}
    assert DecodeOptions().inductor_options(decode=False) == {}  # the prefill's GEMMs are cuBLAS's: nothing to tune
    with pytest.raises(ValueError, match="the decode step's options coordinate_descent_tuning, one_shot_all_reduce, "
                                         "push_all_reduce, push_norm, store_gemv_inputs are None: choose them with"):
        DecodeOptions().inductor_options()


def test_the_options_are_frozen_and_keep_their_own_dicts():
    inductor, blocks = {"max_autotune": True}, {"8x16": [1, 16, 4]}
    options = DecodeOptions(inductor=inductor, gemv_blocks=blocks)
    inductor["max_autotune"], blocks["16x16"] = False, [1, 16, 4]
    assert options.inductor == {"max_autotune": True} and options.gemv_blocks == {"8x16": [1, 16, 4]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.gemv = True
    assert hash(options) == hash(DecodeOptions(inductor={"max_autotune": False}))  # the dicts are not hashed


def test_decode_options_checks_the_request_then_the_device():
    with pytest.raises(TypeError, match="compile is True, False"):
        decode_options("yes", "", 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="pass a CUDA device, or compile=False on the CPU"):
        decode_options(True, "", 1, torch.device("cpu"))
    cuda = torch.device("cuda", 0)  # one rank: no symmetric-memory probe, so nothing touches a GPU
    assert decode_options({"gemv": True}, "", 1, cuda) == resolve(DecodeOptions(gemv=True), 1, False)
