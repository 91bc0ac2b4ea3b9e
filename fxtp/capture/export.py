"""Capture a HF model as an ATen FX graph with torch.export (non-strict).

The graph's inputs are those of the model's kind (fxtp/capture/signatures.py; (input_ids,
attention_mask) for a causal LM) with dynamic batch and sequence lengths, and its output is the
logits (or an encoder's hidden states). Parameters, buffers and lifted constants become
placeholders whose `node.meta["fxtp.state"]` names the model state they hold (e.g. "model.layers.0.mlp.up_proj.weight").
Lifted constants keep their values on the meta device too (list indices and scalars, _ConstantsOnCPU),
and `Captured.constants` names them: their values come from the capture, never from a checkpoint.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Collection

import torch
import torch.fx as fx
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.export.graph_signature import InputKind

from fxtp.capture.data_dependent import data_dependent_reason
from fxtp.capture.loop_free import loop_free
from fxtp.capture.shape_constraints import ShapeConstraintError, exported
from fxtp.capture.signatures import TOKEN_IDS, Forward, signature_of
from fxtp.progress import stage
from fxtp.capture.state_names import aliases
from fxtp.node_meta import STATE, TOKENS

USER_INPUTS = ("input_ids", "attention_mask")


class CaptureError(RuntimeError):
    pass


class _ConstantsOnCPU(TorchFunctionMode):
    """Keep the values of the constants a forward makes, which on the meta device would become
    meta tensors without values:
    - index with an int64 CPU tensor where the code indexes with a list of ints (`x[..., [-2], :]`,
      same result): the unfuse pass reads these values to find the pieces a fused q|k|v is cut into
      (Falcon-7B's multi-query k = h[:, :, [-2]]);
    - make `torch.tensor(<number>, device=<meta>)` on the CPU: a 0-dim CPU tensor mixes with
      tensors of any device, and the rank programs need its value (transformers 5.17's eager
      attention mask is `torch.where(mask, torch.tensor(0.0, device=mask.device), min)`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            x, index = args
            args = (x, tuple(map(_int_list_as_tensor, index)) if isinstance(index, tuple) else _int_list_as_tensor(index))
        elif func is torch.tensor and args and isinstance(args[0], (bool, int, float)) and \
                torch.device(kwargs.get("device") or "cpu").type == "meta":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def constants_on_cpu(device: torch.device):
    """The context to export a model on `device` in (see _ConstantsOnCPU)."""
    return _ConstantsOnCPU() if device.type == "meta" else nullcontext()


def _int_list_as_tensor(index):
    if isinstance(index, list) and index and all(type(i) is int for i in index):
        return torch.tensor(index, dtype=torch.long)
    return index


@dataclass
class Captured:
    graph_module: fx.GraphModule  # placeholders: state (meta[STATE]) then the user inputs
    state: dict[str, torch.Tensor]  # FQN -> tensor (meta tensors when the model is on meta)
    device: torch.device
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied weights' other names
    constants: frozenset = frozenset()  # state names of the constants export lifted (no checkpoint holds them)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def export_model(model: torch.nn.Module, wrapper: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes,
                 what: str, hint: str = "", training: bool = False):
    """torch.export (non-strict) of `wrapper`, a module calling `model`, with the model in eval mode (in
    train mode with `training`: dropout stays in the graph), and with the bounds and multiples its forward
    requires of the dynamic dims (fxtp/capture/shape_constraints.py); a failure is a CaptureError naming
    the model, `what` was captured of it, and `hint`."""
    device = model_device(model)
    was_training = model.training
    model.train(training)
    try:
        # CUDA's fused attention kernels make export guard seq to a multiple of 8 (mask alignment);
        # the math backend has no such guard, and the graph keeps the one SDPA op either way, so at
        # run time the fastest kernel is still chosen. Recurrences' loops would fix the sequence length (fxtp/capture/loop_free.py).
        with sdpa_kernel([SDPBackend.MATH]), constants_on_cpu(device), loop_free(model), \
                stage(f"torch.export of {type(model).__name__}{what}"):
            return exported(wrapper, args, kwargs, dynamic_shapes)
    except Exception as e:  # export errors are long; keep them whole inside ours
        failed = f"torch.export could not capture {model_name(model)}{what}: "
        if isinstance(e, ShapeConstraintError):  # in words; torch's error is its cause
            reason, e = str(e), e.__cause__
        else:
            reason = data_dependent_reason(model, e)
        if reason:  # first: torch's own message is long (it prints the graph traced so far)
            raise CaptureError(f"{failed}{reason}" + (f" {hint}" if hint else "") +
                               f"\n\ntorch.export: {type(e).__name__}: {e}") from e
        raise CaptureError(f"{failed}{type(e).__name__}: {e}" + (f"\n{hint}" if hint else "")) from e
    finally:
        model.train(was_training)


def model_name(model: torch.nn.Module) -> str:
    """The model's class, with its HF model type where it has one: "LlamaForCausalLM (llama)"."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return type(model).__name__ + (f" ({model_type})" if model_type else "")


def max_positions(model: torch.nn.Module) -> int:
    """The longest sequence the model's config allows (4096 where it does not say)."""
    return getattr(model.config, "max_position_embeddings", None) or 4096


def capture(model: torch.nn.Module, example_batch: int = 2, example_seq: int = 16) -> Captured:
    """Export `model` (real or meta weights) to a flat ATen graph of the inputs of its kind
    (fxtp/capture/signatures.py: (input_ids, attention_mask) for a causal LM)."""
    signature = signature_of(model)
    device = model_device(model)
    example = signature.example_inputs(model, example_batch, example_seq, device)
    ep = export_model(model, Forward(model, signature), (), example,
                      signature.dynamic_shapes(4096, max(max_positions(model), example_seq)), "",
                      "fxtp needs a model that torch.export (non-strict) can trace with use_cache=False; check "
                      f"that the model runs forward({', '.join(signature.inputs)}).")
    return flatten_model(ep, model, signature.inputs)


def flatten_model(ep, model: torch.nn.Module, user_inputs: tuple, outputs: int = 1) -> Captured:
    """`flatten` of an export of `model` (wrapped as the attribute "model"): on the model's device,
    with its tied weights' other names."""
    captured = flatten(ep, model_device(model), user_inputs, outputs=outputs)
    captured.aliases = aliases(model)
    return captured


def flatten(ep, device, user_inputs: tuple = USER_INPUTS, prefix: str = "model.",
            token_ids: Collection[str] = TOKEN_IDS, outputs: int = 1) -> Captured:
    """The exported program as one GraphModule: state placeholders get meta[STATE] (their FQN
    without `prefix`), the user inputs must be `user_inputs` (those named in `token_ids` get
    meta[TOKENS]), and the output has `outputs` values: one is unwrapped, more stay a tuple.
    The graph is as export made it: fxtp.compile cleans it up (passes/capture/clean_up.py) before
    planning."""
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state: dict[str, torch.Tensor] = {}
    constants = set()
    sd = ep.state_dict
    for node, spec in zip(placeholders, ep.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            continue
        value = sd[spec.target] if spec.target in sd else ep.constants[spec.target]
        name = spec.target.removeprefix(prefix)  # "model.": the Forward wrapper's attribute
        node.meta[STATE] = name
        state[name] = value
        if spec.kind == InputKind.CONSTANT_TENSOR:
            constants.add(name)
    user = [n for n in placeholders if STATE not in n.meta]
    if [n.name for n in user] != list(user_inputs):
        raise CaptureError(f"unexpected graph inputs {[n.name for n in user]}")
    for node in user:
        node.meta[TOKENS] = node.name in token_ids
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if len(out.args[0]) != outputs:
        raise CaptureError(f"expected {outputs} output(s) (logits or hidden states; a loss), got {len(out.args[0])}")
    out.args = (out.args[0][0],) if outputs == 1 else (tuple(out.args[0]),)
    gm.recompile()
    return Captured(gm, state, device, constants=frozenset(constants))
