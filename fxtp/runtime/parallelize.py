"""`fxtp.parallelize`: one call from a HF model to a sharded one that HF's generate() and pipeline() drive.

It takes the place of DeepSpeed's `init_inference(model, mp_size=N)` and of loading with
`tp_plan="auto"`: the seed's lines stay as they are and only the init line changes.
"""
from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist

from fxtp.decode.options import DecodeOptions
from fxtp.rank_ops.inputs import exact_device
from fxtp.runtime.hf_model import ParallelRuntime, hf_model
from fxtp.runtime.program import compile_on_first_use

PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)  # a rank that never arrives ends the run, not hangs it for 30


def parallelize(model: torch.nn.Module, world_size: Optional[int] = None, *, plan: Union[str, dict] = "auto",
                tp_plan: Optional[dict] = None, injection_policy: Optional[dict] = None,
                checkpoint: Optional[str] = None, device: Union[str, torch.device, None] = None,
                compile: Union[bool, dict, DecodeOptions] = False) -> torch.nn.Module:
    """`model` sharded over `world_size` ranks, as an object of the model's own class that
    `model.generate(...)`, `transformers.pipeline(...)` and `model(...)` accept as they accept `model`.

    - Under torchrun (or once torch.distributed is initialized) it is this process's rank: world_size
      defaults to the number of processes, and the process group is started if it is not (NCCL on
      CUDA, gloo on CPU). Every rank must call generate() with the same arguments (checked), and
      gets the same tokens.
    - In one process it runs all `world_size` ranks in lockstep (default 1), on CPU too.
    - `checkpoint`: a HF safetensors directory or file to read this rank's slices from, for a model
      built on meta (`with torch.device("meta"): model = AutoModelForCausalLM.from_config(config)`).
    - `device`: where the shards live; default: the model's device, or for a model on meta
      cuda:LOCAL_RANK when CUDA is available, else cpu.
    - `compile`: run decode steps compiled as a CUDA graph (True, or fxtp.DecodeOptions); one rank
      per process, on CUDA.
    - plan / tp_plan / injection_policy: as for fxtp.compile.

    Arguments are checked here; the model is captured at the first call that needs it: generate()
    captures the step with a KV cache, and only a forward without a cache captures the plain forward.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generation_config"):
        raise TypeError(f"fxtp.parallelize takes a HF model that can generate (a ...ForCausalLM or an "
                        f"encoder-decoder ...ForConditionalGeneration), got {type(model).__name__}")
    device = _device(model, device)
    group, world_size = _process_group(world_size, device)
    program = compile_on_first_use(model, world_size, plan=plan, tp_plan=tp_plan, injection_policy=injection_policy)
    rank = dist.get_rank(group) if group is not None else (0 if world_size == 1 else None)
    generator = program.generator(rank, device, group, checkpoint=checkpoint, compile=compile)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return hf_model(ParallelRuntime(program, generator, rank, group.group_name if group is not None else None, device,
                                    dtype))


def _device(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return exact_device(device)
    placed = next((p.device for p in model.parameters()), torch.device("cpu"))
    if placed.type != "meta":
        return placed
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _process_group(world_size: Optional[int], device: torch.device) -> tuple[Optional[dist.ProcessGroup], int]:
    """(the default process group, or None to run every rank in this process; the world size)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if not (dist.is_available() and (dist.is_initialized() or launched > 1)):
        return None, 1 if world_size is None else world_size
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_destroy_started_group)
    processes = dist.get_world_size()
    if world_size is not None and world_size != processes:
        raise ValueError(f"world_size={world_size}, but {processes} processes were launched: leave world_size out "
                         f"under torchrun, or launch {world_size} (torchrun --nproc_per_node {world_size})")
    if processes == 1:
        return None, 1
    return dist.group.WORLD, processes


def _destroy_started_group() -> None:
    """At exit, the default group fxtp started is destroyed while the interpreter is whole, as torch asks
    of whoever starts one: torn down at interpreter exit instead, gloo's threads can end a process whose
    work is all done with "terminate called without an active exception" (SIGABRT), which torchrun
    reports as a failure."""
    if dist.is_initialized():
        dist.destroy_process_group()
