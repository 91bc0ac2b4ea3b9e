"""A training rank module whose parameters are DTensors on the tensor-parallel DeviceMesh.

The rank graph computes on local tensors; this module holds the same memory as DTensors, each with
the placement of its fxtp layout (Shard(dim) or Replicate), and runs the graph on their local parts
(`to_local()` is differentiable: each .grad is a DTensor of the same placement). So the torch
ecosystem sees the global tensors and needs nothing from fxtp:
- `torch.nn.utils.clip_grad_norm_` gives the global norm: a sharded gradient's squares are summed
  over the ranks, a replicated one is counted once;
- `torch.distributed.checkpoint` saves and loads each rank's part under the global shape;
- any torch optimizer steps the DTensors, elementwise, on each rank's part.

Where fxtp's layouts and DTensor's placements differ: DTensor's Shard splits a dim as torch.chunk
does, fxtp's on head (or block) boundaries (Shard(dim, counts, inner, outer)).
- Uneven heads (4 heads over 3 ranks: 2, 1, 1 heads, where chunk would split 22, 22, 20 rows): the
  local sizes differ from DTensor's, which its autograd cannot take, so the module is refused (use
  a world size that divides the heads, or tp.module(rank) with local tensors).
- Blocks (GPT-2's fused q|k|v, each rank a part of each block): the sizes are chunk's, only the
  elements differ, which the norm and the optimizers never see; a checkpoint would place them
  wrongly, so `state_dict()` refuses, naming the parameters.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate as ReplicatePlacement, Shard as ShardPlacement
from torch.func import functional_call

from fxtp.passes.codegen.rewrite import set_state
from fxtp.sharding.layouts import Layout, Shard


def chunk_sizes(layout: Layout) -> bool:
    """Whether every rank's part of `layout` has the size DTensor's Shard(dim) (torch.chunk's split) gives it."""
    if not isinstance(layout, Shard):
        return True
    if not isinstance(layout.inner, int) or not isinstance(layout.outer, int):
        return False
    chunks = [len(c) for c in torch.arange(layout.global_size).chunk(len(layout.counts))]
    chunks += [0] * (len(layout.counts) - len(chunks))
    return chunks == [layout.local_size(rank) for rank in range(len(layout.counts))]


def chunk_compatible(layout: Layout) -> bool:
    """Whether DTensor's Shard(dim) puts every element of `layout` where fxtp does."""
    return chunk_sizes(layout) and (not isinstance(layout, Shard) or layout.outer == 1)


def _global_dtensor(local: torch.Tensor, layout: Layout, mesh: DeviceMesh) -> DTensor:
    shape = list(local.shape)
    if isinstance(layout, Shard):
        shape[layout.dim] = layout.global_size
        placement = ShardPlacement(layout.dim)
    else:
        placement = ReplicatePlacement()
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)


class DTensorRankModule(torch.nn.Module):
    """`rank_module`'s parameters as DTensors on `mesh` (same names, same memory); calling it runs
    `rank_module` on their local parts."""

    def __init__(self, rank_module: fx.GraphModule, layouts: dict[str, Layout], mesh: DeviceMesh):
        super().__init__()
        uneven = [name for name, _ in rank_module.named_parameters() if not chunk_sizes(layouts[name])]
        if uneven:
            raise ValueError(f"{len(uneven)} parameters ({', '.join(uneven[:3])}, ...) are split unevenly on head "
                             "boundaries, in parts of other sizes than DTensor's (torch.chunk's), so they cannot be "
                             "DTensors: use a world size that divides the heads, or tp.module(rank), whose parameters "
                             "are local tensors (clip_grad_norm_ then sees this rank's gradients only)")
        if mesh.ndim != 1:
            raise ValueError(f"pass the tensor-parallel dim of the mesh (mesh['tp']), a 1-D mesh; got {mesh.ndim} dims")
        object.__setattr__(self, "rank_module", rank_module)  # not a submodule: its tensors are these DTensors' parts
        self.layouts = layouts
        for name, local in rank_module.named_parameters():
            local.requires_grad_(False)  # trained through the DTensor, whose .grad holds the gradient
            set_state(self, name, torch.nn.Parameter(_global_dtensor(local.detach(), layouts[name], mesh)))

    def forward(self, *args, **kwargs):
        local = {name: p.to_local() for name, p in self.named_parameters()}
        return functional_call(self.rank_module, local, args, kwargs)

    def state_dict(self, *args, **kwargs):
        """nn.Module's state_dict, refused where a parameter's fxtp layout has no DTensor placement with the
        same offsets (a checkpoint would put its parts in the wrong places)."""
        blocked = [name for name, _ in self.named_parameters() if not chunk_compatible(self.layouts[name])]
        if blocked:
            raise ValueError(f"{len(blocked)} parameters ({', '.join(blocked[:3])}, ...) are fused blocks (q|k|v in "
                             "one weight) that each rank holds a part of, which DTensor's Shard cannot say, so "
                             "torch.distributed.checkpoint would place their parts wrongly: save "
                             "fxtp.runtime.whole_state.whole_state(...) of every rank's parameters instead")
        return super().state_dict(*args, **kwargs)
