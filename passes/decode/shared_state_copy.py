"""A rank module's twin: the same parameters and buffers (the KV cache among them) under a copy of
its graph, in a class of its own. Dynamo caches compiled code per code object, so a twin compiles
apart from the module and from other twins (the decode step with push all_reduce, the prefill)."""
from __future__ import annotations

import copy

import torch.fx as fx


def twin(module: fx.GraphModule, role: str) -> fx.GraphModule:
    """A twin of `module` whose class is named after it and `role`; its graph may be rewritten."""
    module_twin = fx.GraphModule(module, copy.deepcopy(module.graph), class_name=f"{type(module).__name__}{role}")
    module_twin.eval()
    return module_twin


def retargeted(module: fx.GraphModule, role: str, old, new, **kwargs) -> fx.GraphModule:
    """A twin of `module` (see `twin`) whose calls of `old` call `new` with the same arguments (and
    `kwargs`, if any, in place of theirs). `module` is left as it was."""
    module_twin = twin(module, role)
    for node in module_twin.graph.nodes:
        if node.op == "call_function" and node.target is old:
            node.target = new
            if kwargs:
                node.kwargs = kwargs
    module_twin.graph.lint()
    module_twin.recompile()
    return module_twin
