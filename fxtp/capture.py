"""Capture a HF causal LM as an ATen FX graph with torch.export (non-strict).

The graph's inputs are (input_ids, attention_mask) with dynamic batch and sequence length and
its output is the logits. Parameters, buffers and lifted constants become placeholders whose
`node.meta["fxtp.state"]` names the model state they hold (e.g. "model.layers.0.mlp.up_proj.weight").
Lifted constants keep their values on the meta device too (list indices, _ListIndicesOnCPU).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.export import Dim
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.export.graph_signature import InputKind

from fxtp.checkpoint import aliases
from fxtp.passes.inline_wrappers import inline_wrappers
from fxtp.passes.remove_identities import remove_identities
from fxtp.passes.split_bias import split_bias

STATE = "fxtp.state"
USER_INPUTS = ("input_ids", "attention_mask")


class CaptureError(RuntimeError):
    pass


class _ListIndicesOnCPU(TorchFunctionMode):
    """Index with an int64 CPU tensor where the code indexes with a list of ints
    (`x[..., [-2], :]`, same result). On the meta device the list would become a meta tensor
    without values, and the unfuse pass reads these values to find the pieces a fused q|k|v
    is cut into (Falcon-7B's multi-query k = h[:, :, [-2]]); a CPU tensor keeps them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            x, index = args
            args = (x, tuple(map(_int_list_as_tensor, index)) if isinstance(index, tuple) else _int_list_as_tensor(index))
        return func(*args, **(kwargs or {}))


def _int_list_as_tensor(index):
    if isinstance(index, list) and index and all(type(i) is int for i in index):
        return torch.tensor(index, dtype=torch.long)
    return index


class _Logits(torch.nn.Module):
    """The model as a function of (input_ids, attention_mask) -> logits, without a KV cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass
class Captured:
    graph_module: fx.GraphModule  # placeholders: state (meta[STATE]) then input_ids, attention_mask
    state: dict[str, torch.Tensor]  # FQN -> tensor (meta tensors when the model is on meta)
    device: torch.device
    aliases: dict[str, list[str]] = field(default_factory=dict)  # tied weights' other names


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_causal_lm(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxtp.compile expects a torch.nn.Module (a HF causal LM), got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(
            f"fxtp.compile supports HF causal LMs (AutoModelForCausalLM); {type(model).__name__} has no "
            "language-model head. Load the model with AutoModelForCausalLM.from_config/from_pretrained.")
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{type(model).__name__} is an encoder-decoder model; fxtp shards decoder-only causal LMs.")


def capture(model: torch.nn.Module, example_batch: int = 2, example_seq: int = 16) -> Captured:
    """Export `model` (real or meta weights) to a flat ATen graph of (input_ids, attention_mask)."""
    check_causal_lm(model)
    device = _model_device(model)
    vocab = model.config.vocab_size
    ids = torch.randint(1, max(2, vocab), (example_batch, example_seq), device=device) if device.type != "meta" \
        else torch.ones(example_batch, example_seq, dtype=torch.long, device=device)
    mask = torch.ones(example_batch, example_seq, dtype=torch.long, device=device)
    max_seq = getattr(model.config, "max_position_embeddings", None) or 4096
    # DYNAMIC hints, not named Dims: torch 2.11 cannot prove some stride guards such as
    # min(16*seq, 32*seq) == 16*seq, which named Dims turn into hard errors.
    batch, seq = Dim.DYNAMIC(min=1, max=4096), Dim.DYNAMIC(min=1, max=max(max_seq, example_seq))
    was_training = model.training
    model.eval()
    try:
        # CUDA's fused attention kernels make export guard seq to a multiple of 8 (mask alignment);
        # the math backend has no such guard, and the graph keeps the one SDPA op either way, so at
        # run time the fastest kernel is still chosen.
        with sdpa_kernel([SDPBackend.MATH]), _ListIndicesOnCPU() if device.type == "meta" else nullcontext():
            ep = torch.export.export(_Logits(model), (ids, mask), strict=False,
                                     dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    except Exception as e:  # export errors are long; keep them whole inside ours
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} ({model.config.model_type}): "
            f"{type(e).__name__}: {e}\nfxtp needs a model that torch.export (non-strict) can trace with "
            "use_cache=False; check that the model runs forward(input_ids, attention_mask).") from e
    finally:
        model.train(was_training)
    captured = flatten(ep, device)
    captured.aliases = aliases(model)
    return captured


def flatten(ep, device, user_inputs: tuple = USER_INPUTS, prefix: str = "model.") -> Captured:
    """The exported program as one GraphModule: state placeholders get meta[STATE] (their FQN
    without `prefix`), the user inputs must be `user_inputs`, and the single output is unwrapped.
    Context wrappers are inlined, identities dropped, biases split from their GEMMs and projections
    cut into unequal pieces unfused into one per piece over derived state (passes/)."""
    gm = split_bias(remove_identities(inline_wrappers(ep.graph_module)))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state: dict[str, torch.Tensor] = {}
    sd = ep.state_dict
    for node, spec in zip(placeholders, ep.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            continue
        value = sd[spec.target] if spec.target in sd else ep.constants[spec.target]
        name = spec.target.removeprefix(prefix)  # "model.": the _Logits wrapper's attribute
        node.meta[STATE] = name
        state[name] = value
    user = [n for n in placeholders if STATE not in n.meta]
    if [n.name for n in user] != list(user_inputs):
        raise CaptureError(f"unexpected graph inputs {[n.name for n in user]}")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if len(out.args[0]) != 1:
        raise CaptureError(f"expected one output (logits), got {len(out.args[0])}")
    out.args = (out.args[0][0],)
    # imported here: the pass reuses the planner's recognizers, and the planner imports this module
    from fxtp.passes.unfuse_projections import unfuse_projections
    unfuse_projections(gm, state)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return Captured(gm, state, device)
