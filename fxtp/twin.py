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
