"""Manual plans: the user names which projections are column- or row-parallel.

Three spellings, all turned into a `ManualPlan` {module name pattern: Role}:
- fxtp's own: {"model.layers.*.self_attn.q_proj": "colwise", "*.o_proj": "rowwise", ...}
  (fnmatch patterns over full module names, passes/sharding/module_patterns.py; the first pattern
  that matches a module wins; STYLES names the roles). Every pattern must match a module: one that
  matches none is a PlanError with the closest patterns that do, not a model left replicated;
- an HF `tp_plan` dict, or "auto" for the model's own (`model._tp_plan`, or the config's
  `base_model_tp_plan` under the base model's prefix). HF styles map by what they do to the
  weight: *colwise* -> colwise, *rowwise* -> rowwise, anything else stays replicated. Its patterns
  are taken as HF takes them: HF's own plans name modules that only some configurations have, and
  parameters (a MoE layer's experts.gate_up_proj), which fxtp's module patterns leave alone;
- a DeepSpeed `injection_policy` {block class: (row-parallel linear names, ...)}: in every block
  of that class the named projections (module names within the block, or their dotted suffixes,
  as DeepSpeed matches them) are rowwise and its other projections colwise. Each name must be
  in some block of its class.

Reads:  node.meta["val"], ["fxtp.state"]; the automatic planner's projection groups, units and
        head-aligned counts (passes/sharding/plan.py).
Writes: through `propagate` (not strict: a manual plan may ask for redistributions, which the
        dump then shows). A rowwise projection whose input is not sharded, or a colwise one that
        cannot be split, is an error naming the node.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Optional, Union

import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT, STATE
from fxtp.sharding.layouts import Shard
from fxtp.sharding.roles import Role
from fxtp.passes.sharding.module_patterns import closest, example, matches_any, module_names
from fxtp.passes.sharding.plan import GroupDecision, Plan, column_seeds
from fxtp.passes.sharding.projections import projection_groups, projection_site
from fxtp.passes.sharding.propagate import propagate

# the user-facing styles of fxtp's own form, as gpt-fast and HF name them
STYLES = {"colwise": Role.COLUMN_PARALLEL, "rowwise": Role.ROW_PARALLEL, "replicate": Role.REPLICATED}


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class ManualPlan:
    roles: dict[str, Role]  # module name pattern -> the role of the projections of the modules it matches

    def role_of(self, module: str) -> Optional[Role]:
        """The role of the first pattern that matches `module`, None where none does."""
        return next((role for pattern, role in self.roles.items() if fnmatchcase(module, pattern)), None)


def from_styles(styles: dict[str, str], modules: set[str]) -> ManualPlan:
    """fxtp's own form, checked against the model's module names."""
    bad = {p: s for p, s in styles.items() if s not in STYLES}
    if bad:
        raise PlanError(f"unknown styles {bad}: use one of {tuple(STYLES)}")
    unmatched = [pattern for pattern in styles if not matches_any(pattern, modules)]
    if unmatched:
        raise PlanError("manual plan: " + "; ".join(_no_module(p, modules) for p in unmatched) + ". Patterns match "
                        "full module names with fnmatch ('*' matches dots too): a pattern names a module from the "
                        "model's root, or starts with '*.' to name it in every layer")
    return ManualPlan({pattern: STYLES[style] for pattern, style in styles.items()})


def _no_module(pattern: str, modules: set[str]) -> str:
    near = closest(pattern, modules)
    if not near:
        return f"pattern {pattern!r} matches no module (module names look like {example('*', modules)!r})"
    return (f"pattern {pattern!r} matches no module; closest that do: "
            + ", ".join(f"{p!r} (e.g. {example(p, modules)})" for p in near))


def from_hf_tp_plan(tp_plan, model: torch.nn.Module) -> ManualPlan:
    """An HF tp_plan (dict, or "auto" for the model's own) as a manual plan."""
    if tp_plan == "auto":
        tp_plan = getattr(model, "_tp_plan", None) or {
            f"{model.base_model_prefix}.{k}": v for k, v in (getattr(model.config, "base_model_tp_plan", None) or {}).items()}
        if not tp_plan:
            raise PlanError(f"{type(model).__name__} has no tp_plan of its own (config.base_model_tp_plan is empty): "
                            "pass a dict, or use fxtp's automatic plan")
    if not isinstance(tp_plan, dict):
        raise PlanError(f"tp_plan must be a dict of module patterns to HF styles or 'auto', got {type(tp_plan).__name__}")
    return ManualPlan({pattern: Role.COLUMN_PARALLEL if "colwise" in style else Role.ROW_PARALLEL if "rowwise" in style
                       else Role.REPLICATED for pattern, style in tp_plan.items()})


def from_injection_policy(policy: dict, model: torch.nn.Module) -> ManualPlan:
    """DeepSpeed's {block class: row-parallel names}: the rest of each block's projections are colwise."""
    roles: dict[str, Role] = {}
    modules = [name for name, _ in model.named_modules()]
    for block_class, rowwise in policy.items():
        if isinstance(rowwise, str):
            rowwise = (rowwise,)
        class_name = getattr(block_class, "__name__", block_class)
        blocks = [name for name, module in model.named_modules()
                  if (isinstance(block_class, type) and isinstance(module, block_class)) or type(module).__name__ == block_class]
        if not blocks:
            raise PlanError(f"injection_policy names {class_name}, but the model has no such module")
        # a name may sit deeper in the block: T5's "SelfAttention.o" is "layer.0.SelfAttention.o"
        inside = {m[len(block) + 1:] for block in blocks for m in modules if m.startswith(block + ".")}
        for name in rowwise:
            if not (matches_any(name, inside) or matches_any(f"*.{name}", inside)):
                near = closest(name, inside, tail_prefix="")
                raise PlanError(f"injection_policy: {name!r} is in no {class_name} (names are module names within the "
                                f"block, or their dotted ends){': closest ' + ', '.join(map(repr, near)) if near else ''}")
        for block in blocks:
            roles.update({f"{block}.{prefix}{name}": Role.ROW_PARALLEL for name in rowwise for prefix in ("", "*.")})
            roles[f"{block}.*"] = Role.COLUMN_PARALLEL
    return ManualPlan(roles)


def _module_of(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def manual_plan(gm: fx.GraphModule, world_size: int, plan: Union[dict[str, str], ManualPlan]) -> Plan:
    """The Plan of `plan`: fxtp's own form ({pattern: style}, checked here) or a ManualPlan."""
    if not isinstance(plan, ManualPlan):
        plan = from_styles(plan, module_names(gm))
    result = Plan()
    rowwise: list[fx.Node] = []
    for group in projection_groups(gm):
        names = [projection_site(n).weight.meta[STATE] for n in group]
        roles = {n: plan.role_of(_module_of(name)) for n, name in zip(group, names)}
        rowwise += [n for n in group if roles[n] is Role.ROW_PARALLEL]
        columns = [n for n in group if roles[n] is Role.COLUMN_PARALLEL]
        if not columns:
            role = Role.ROW_PARALLEL if any(roles[n] is Role.ROW_PARALLEL for n in group) else Role.REPLICATED
            result.groups.append(GroupDecision(names, role, "manual plan"))
            continue
        seeds, note = column_seeds(columns, world_size)
        if not seeds:
            raise PlanError(f"manual plan: {', '.join(names)} cannot be column-parallel over {world_size} ranks: {note}")
        result.seeds.update(seeds)
        result.groups.append(GroupDecision(names, Role.COLUMN_PARALLEL, f"manual plan{'; ' + note if note else ''}"))
    propagate(gm, result.seeds)
    for node in rowwise:
        site = projection_site(node)
        weight, x = site.weight, site.activation
        if not isinstance(weight.meta[LAYOUT], Shard) or weight.meta[LAYOUT].dim == site.weight_out:
            raise PlanError(f"manual plan: {_module_of(weight.meta[STATE])} is rowwise, but its input "
                            f"{x.name} is {x.meta[LAYOUT]} (not sharded on its features) "
                            f"for node={node.format_node()}: mark the projections that feed it colwise")
    return result
