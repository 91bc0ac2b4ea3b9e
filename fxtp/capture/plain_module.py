"""Capture a plain nn.Module, one without a HF config, from the example inputs its user passes.

A HF model's kind says which inputs it is captured with (fxtp/capture/signatures.py); a plain
module says nothing, so the user gives its positional inputs (`example_inputs`) and, where fxtp
cannot tell, which of their dims are dynamic. Everything else the planner needs comes from the
graph, as for a HF model: head units from the reshapes after each projection, the vocabulary from
the embedding tables the token ids index. The token ids are the 2-D integer inputs [batch, seq];
their batch and sequence dims are dynamic unless the user says otherwise. The graph's output must
be one tensor (logits, hidden states): the rank programs return what the module returns.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.export import Dim

from fxtp.capture.export import Captured, export_model, flatten, model_device
from fxtp.capture.state_names import aliases

__all__ = ["is_hf_model", "example_tuple", "token_dims", "capture_plain", "attention_heads"]

aten = torch.ops.aten
ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]

_DYNAMIC_HINT = ("fxtp marks dims 0 and 1 (batch, seq) of each 2-D integer input dynamic; where the module "
                 "fixes one of them, pass dynamic_shapes= in torch.export's form, one entry per input (None for a "
                 "static one), e.g. dynamic_shapes=({0: torch.export.Dim.DYNAMIC},) for a fixed sequence length.")


def is_hf_model(model: torch.nn.Module) -> bool:
    """Whether `model` carries a HF config (a model_type), the one thing that decides the capture path."""
    return hasattr(getattr(model, "config", None), "model_type")


def example_tuple(model: torch.nn.Module, example_inputs: Optional[ExampleInputs]) -> tuple[torch.Tensor, ...]:
    """`example_inputs` as the tuple of tensors `model.forward` is called with; a TypeError says what to pass."""
    name = type(model).__name__
    if example_inputs is None:
        raise TypeError(f"{name} has no HF config, so fxtp cannot tell which inputs to capture it with: pass "
                        f"example_inputs=(input_ids,), the tensors {name}.forward takes positionally "
                        "(e.g. token ids [batch, seq]), to fxtp.compile")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    not_tensors = [f"{i}: {type(x).__name__}" for i, x in enumerate(inputs) if not isinstance(x, torch.Tensor)]
    if not inputs or not_tensors:
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors (the positional inputs of "
                        f"{name}.forward), got {'nothing' if not inputs else ', '.join(not_tensors)}: fxtp "
                        "captures tensor inputs only; bind other arguments in a wrapper module")
    return inputs


def token_dims(inputs: tuple[torch.Tensor, ...]) -> list[int]:
    """Positions of the token-id inputs: 2-D integer tensors [batch, seq]."""
    return [i for i, x in enumerate(inputs) if x.dim() == 2 and not x.dtype.is_floating_point
            and not x.dtype.is_complex and x.dtype != torch.bool]


def default_dynamic_shapes(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """Dynamic batch and sequence of each token-id input, every other input static; a TypeError
    asks for dynamic_shapes where no input is token ids."""
    tokens = token_dims(inputs)
    if not tokens:
        found = ", ".join(f"{x.dtype} {list(x.shape)}" for x in inputs)
        raise TypeError(f"{type(model).__name__}'s example_inputs ({found}) hold no token ids (a 2-D integer tensor "
                        "[batch, seq]), so fxtp cannot tell which dims vary between calls: pass dynamic_shapes= in "
                        "torch.export's form, e.g. dynamic_shapes=({0: torch.export.Dim.DYNAMIC, 1: "
                        "torch.export.Dim.DYNAMIC},) for an input [batch, seq, hidden]")
    # DYNAMIC hints, not named Dims, as for HF models (fxtp/capture/signatures.py: Signature.dynamic_shapes)
    return tuple({0: Dim.DYNAMIC, 1: Dim.DYNAMIC} if i in tokens else None for i in range(len(inputs)))


def _describe(spec) -> str:
    kind = spec.type.__name__ if isinstance(spec.type, type) else str(spec.type)
    return f"a {kind} of {spec.num_children}"


def capture_plain(model: torch.nn.Module, example_inputs: Optional[ExampleInputs],
                  dynamic_shapes: Optional[Any] = None) -> Captured:
    """Export `model` called as `model(*example_inputs)` to a flat ATen graph whose user inputs
    are named after its forward's parameters and whose state keeps the module's own names
    ("layers.0.attention.wq.weight"). `dynamic_shapes` (torch.export's form) defaults to
    `default_dynamic_shapes`."""
    inputs = example_tuple(model, example_inputs)
    if dynamic_shapes is None:
        dynamic_shapes = default_dynamic_shapes(model, inputs)
    ep = export_model(model, model, inputs, {}, dynamic_shapes, "", _DYNAMIC_HINT)
    out_spec = ep.call_spec.out_spec
    output = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    if not out_spec.is_leaf() or not isinstance(output[0].meta.get("val"), torch.Tensor):
        returned = _describe(out_spec) if not out_spec.is_leaf() else type(output[0].meta.get("val")).__name__
        raise TypeError(f"{type(model).__name__}.forward returns {returned}; fxtp compiles a plain module whose "
                        "forward returns one tensor (e.g. logits [batch, seq, vocab]): wrap it in a module that "
                        "returns the tensor you need")
    names = tuple(n.name for n in ep.graph.nodes if n.op == "placeholder")[-len(inputs):]
    captured = flatten(ep, model_device(model), names, prefix="", token_ids={names[i] for i in token_dims(inputs)})
    captured.aliases = aliases(model)
    return captured


def attention_heads(gm: fx.GraphModule) -> Optional[int]:
    """The fewest query heads of the graph's attention ([batch, heads, seq, head_dim] queries of
    scaled_dot_product_attention), None where it has none: fxtp never splits inside a head, so a
    plain module has at most this many ranks (a HF model reads it from its config)."""
    heads = [q.meta["val"].shape[-3] for node in gm.graph.nodes
             if node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default
             for q in node.args[:1] if isinstance(q, fx.Node) and q.meta["val"].dim() >= 3]
    static = [h for h in heads if isinstance(h, int)]
    return min(static) if static else None

