"""Manual plans: the user names which projections are column- or row-parallel.

Three spellings, all turned into {module name pattern: "colwise" | "rowwise" | "replicate"}:
- fxtp's own: {"model.layers.*.self_attn.q_proj": "colwise", "*.o_proj": "rowwise", ...}
  (fnmatch patterns over module names; the first pattern that matches a module wins);
- an HF `tp_plan` dict, or "auto" for the model's own (`model._tp_plan`, or the config's
  `base_model_tp_plan` under the base model's prefix). HF styles map by what they do to the
  weight: *colwise* -> colwise, *rowwise* -> rowwise, anything else stays replicated;
- a DeepSpeed `injection_policy` {block class: (row-parallel linear names, ...)}: in every block
  of that class the named projections (module names within the block, or their dotted suffixes,
  as DeepSpeed matches them) are rowwise and its other projections colwise.

Reads:  node.meta["val"], ["fxtp.state"]; the automatic planner's projection groups, units and
        head-aligned counts (passes/sharding/plan.py).
Writes: through `propagate` (not strict: a manual plan may ask for redistributions, which the
        dump then shows). A rowwise projection whose input is not sharded, or a colwise one that
        cannot be split, is an error naming the node.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Optional

import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT, STATE
from fxtp.sharding.layouts import Shard
from fxtp.passes.sharding.plan import GroupDecision, Plan, column_seeds, projection_groups, projection_weight
from fxtp.passes.sharding.propagate import propagate

STYLES = ("colwise", "rowwise", "replicate")


class PlanError(ValueError):
    pass


def from_hf_tp_plan(tp_plan, model: torch.nn.Module) -> dict[str, str]:
    """An HF tp_plan (dict, or "auto" for the model's own) as fxtp patterns."""
    if tp_plan == "auto":
        tp_plan = getattr(model, "_tp_plan", None) or {
            f"{model.base_model_prefix}.{k}": v for k, v in (getattr(model.config, "base_model_tp_plan", None) or {}).items()}
        if not tp_plan:
            raise PlanError(f"{type(model).__name__} has no tp_plan of its own (config.base_model_tp_plan is empty): "
                            "pass a dict, or use fxtp's automatic plan")
    if not isinstance(tp_plan, dict):
        raise PlanError(f"tp_plan must be a dict of module patterns to HF styles or 'auto', got {type(tp_plan).__name__}")
    return {pattern: "colwise" if "colwise" in style else "rowwise" if "rowwise" in style else "replicate"
            for pattern, style in tp_plan.items()}


def from_injection_policy(policy: dict, model: torch.nn.Module) -> dict[str, str]:
    """DeepSpeed's {block class: row-parallel names}: the rest of each block's projections are colwise."""
    patterns: dict[str, str] = {}
    for block_class, rowwise in policy.items():
        if isinstance(rowwise, str):
            rowwise = (rowwise,)
        blocks = [name for name, module in model.named_modules()
                  if (isinstance(block_class, type) and isinstance(module, block_class)) or type(module).__name__ == block_class]
        if not blocks:
            raise PlanError(f"injection_policy names {getattr(block_class, '__name__', block_class)}, but the model has "
                            "no such module")
        for block in blocks:  # a name may sit deeper in the block: T5's "SelfAttention.o" is "layer.0.SelfAttention.o"
            patterns.update({f"{block}.{prefix}{name}": "rowwise" for name in rowwise for prefix in ("", "*.")})
            patterns[f"{block}.*"] = "colwise"
    return patterns


def _module_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def style_of(module: str, patterns: dict[str, str]) -> Optional[str]:
    return next((style for pattern, style in patterns.items() if fnmatchcase(module, pattern)), None)


def manual_plan(gm: fx.GraphModule, world_size: int, patterns: dict[str, str]) -> Plan:
    bad = {p: s for p, s in patterns.items() if s not in STYLES}
    if bad:
        raise PlanError(f"unknown styles {bad}: use one of {STYLES}")
    result = Plan()
    rowwise: list[fx.Node] = []
    for group in projection_groups(gm):
        names = [projection_weight(n)[0].meta[STATE] for n in group]
        styles = {n: style_of(_module_of(name), patterns) for n, name in zip(group, names)}
        rowwise += [n for n in group if styles[n] == "rowwise"]
        columns = [n for n in group if styles[n] == "colwise"]
        if not columns:
            role = "row-parallel" if any(styles[n] == "rowwise" for n in group) else "replicated"
            result.groups.append(GroupDecision(names, role, "manual plan"))
            continue
        seeds, note = column_seeds(columns, world_size)
        if not seeds:
            raise PlanError(f"manual plan: {', '.join(names)} cannot be column-parallel over {world_size} ranks: {note}")
        result.seeds.update(seeds)
        result.groups.append(GroupDecision(names, "column-parallel", f"manual plan{'; ' + note if note else ''}"))
    propagate(gm, result.seeds)
    for node in rowwise:
        weight, out_dim = projection_weight(node)
        if not isinstance(weight.meta[LAYOUT], Shard) or weight.meta[LAYOUT].dim == out_dim:
            raise PlanError(f"manual plan: {_module_of(weight.meta[STATE])} is rowwise, but its input "
                            f"{node.args[0].name} is {node.args[0].meta[LAYOUT]} (not sharded on its features) "
                            f"for node={node.format_node()}: mark the projections that feed it colwise")
    return result
