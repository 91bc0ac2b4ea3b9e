"""fxtp.compile's arguments, checked before anything is captured, and the plan in fxtp's own form."""
from __future__ import annotations

from typing import Optional

import torch

from fxtp.capture.plain_module import ExampleInputs, is_hf_model
from fxtp.passes.sharding.manual_plan import from_hf_tp_plan, from_injection_policy


def config_heads(config) -> Optional[int]:
    """The attention heads of a layer, where the config names them: the most ranks fxtp can use."""
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_heads(model: torch.nn.Module, world_size: int) -> None:
    """Refuse more ranks than the heads the model's config names."""
    heads = config_heads(getattr(model, "config", None))
    if heads is not None and world_size > heads:
        raise ValueError(f"world_size={world_size} is larger than the model's {heads} attention heads; fxtp never "
                         f"splits inside a head, so use world_size <= {heads}")


def checked_spec(model: torch.nn.Module, world_size: int, plan, tp_plan, injection_policy: Optional[dict],
                 example_inputs: Optional[ExampleInputs], dynamic_shapes, training: bool):
    """fxtp.compile's arguments checked, and the plan in fxtp's own form: "auto" or {pattern: role}."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if sum(x is not None for x in (tp_plan, injection_policy)) + (plan != "auto") > 1:
        raise ValueError("give one of plan=..., tp_plan=... or injection_policy=...")
    if not (plan == "auto" or isinstance(plan, dict)):
        raise ValueError(f"plan must be 'auto' or a dict of module patterns to colwise/rowwise/replicate, got {plan!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxtp.compile expects a torch.nn.Module (a HF model, or a plain module with example_inputs=...), "
                        f"got {type(model).__name__}: load the model first, e.g. AutoModelForCausalLM.from_pretrained(name)")
    hf = is_hf_model(model)
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    if training and not hf:
        raise TypeError(f"training=True needs a HF causal LM (its forward computes the loss from labels); "
                        f"{type(model).__name__} is a plain nn.Module")
    if hf and (example_inputs is not None or dynamic_shapes is not None):
        raise ValueError(f"example_inputs and dynamic_shapes are for plain nn.Modules; {type(model).__name__} is a HF "
                         "model, captured with the inputs of its kind (input_ids, attention_mask, ...): leave them out")
    if not hf and tp_plan == "auto":
        raise ValueError(f"tp_plan='auto' reads the plan a HF model declares; {type(model).__name__} is a plain "
                         "nn.Module: pass plan={pattern: 'colwise' | 'rowwise' | 'replicate'} or use the automatic plan")
    check_heads(model, world_size)
    if tp_plan is not None:
        return from_hf_tp_plan(tp_plan, model)
    if injection_policy is not None:
        return from_injection_policy(injection_policy, model)
    return plan
