"""What the op-rule families share: reading a node's values and dims, and the safe fallback."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxtp.sharding.layouts import Partial, Replicate, Shard
from fxtp.sharding.op_rules.rule import Decision, LayoutOf

R = Replicate()
P = Partial()


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_tensor_node(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(val(n), torch.Tensor)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if is_tensor_node(n)]


def ndim(n) -> int:
    return val(n).dim()


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Shapes known equal without guarding: sizes of data-dependent splits (JetMoE's rows per
    expert, unbacked symbols) compare as unknown, so as different, instead of raising."""
    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def out_count(node: fx.Node) -> int:
    v = val(node)
    return len(v) if isinstance(v, (tuple, list)) else 1


def arg(node: fx.Node, index: int, name: str):
    """The argument at `index`, or the keyword `name` where the call passes it so (None if neither)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def replicate_all(node: fx.Node, lay: LayoutOf, note: str = "") -> Decision:
    """Correct for any op: compute it on full inputs on every rank."""
    wants = {n: R for n in tensor_inputs(node) if not isinstance(lay(n), Replicate)}
    v = val(node)
    out = tuple(R for _ in v) if isinstance(v, (tuple, list)) else (R if isinstance(v, torch.Tensor) else None)
    if wants and not note:
        note = f"no rule for {node.target} on sharded inputs"
    return Decision(out, wants, note)


def shard_of(n, lay) -> Optional[Shard]:
    layout = lay(n) if isinstance(n, fx.Node) else None
    return layout if isinstance(layout, Shard) else None


def op_name(target) -> Optional[str]:
    """'namespace::name' of an op overload (how the table names ops fxtp does not import), else None."""
    return target.name() if isinstance(target, torch._ops.OpOverload) else None


def calls(node: fx.Node, ops) -> bool:
    """Whether `node` calls one of `ops`, given as overloads or by op_name."""
    return node.op == "call_function" and (node.target in ops or op_name(node.target) in ops)


def written_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs an in-place op writes (add_, index_copy_, masked_fill_, ...): those its schema marks."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    return [a for a, spec in zip(node.args, schema.arguments)
            if isinstance(a, fx.Node) and spec.alias_info is not None and spec.alias_info.is_write]


def view_chain(node: fx.Node) -> list[fx.Node]:
    """`node` and the views it is of, back to the first value that is no view (ATen ops whose schema
    returns an alias of their first input)."""
    chain = []
    while isinstance(node, fx.Node) and isinstance(node.target, torch._ops.OpOverload) and node.args \
            and any(r.alias_info is not None and not r.alias_info.is_write for r in node.target._schema.returns):
        chain.append(node)
        node = node.args[0]
    return chain
