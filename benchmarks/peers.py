"""The baselines fxtp is measured against, each set up from one HF checkpoint directory behind
one interface: `setup(ctx) -> Runner`, where `runner.generate(ids, mask, new_tokens, streamer)`
returns greedy tokens [B, P + new_tokens] (eos disabled) and `runner.memory()` this rank's bytes of
parameters and KV cache (None where unknown).

- hf:          HF eager on one device.
- hf-compile:  `generation_config.cache_implementation = "static"`: on CUDA, transformers 5.x's
               generate then compiles its decode call itself (CompileConfig: torch.compile with
               fullgraph and mode "reduce-overhead", i.e. CUDA graphs). Wrapping model.forward in
               torch.compile as well (the older docs' recipe) nests two CUDA-graph trees and fails on
               5.17 ("accessing tensor output of CUDAGraphs that has been overwritten").
- hf-tp:       HF tensor parallelism, `from_pretrained(..., distributed_config=DistributedConfig(
               tp_plan="auto", tp_size=N))` (the `tp_plan=` keyword is deprecated in 5.17 and 5.24);
               needs accelerate. Parameters are DTensors: memory counts their local shards.
- deepspeed:   DeepSpeed AutoTP, `deepspeed.init_inference(model, tensor_parallel={"tp_size": N},
               dtype=..., replace_with_kernel_inject=False)` on the model loaded on the CPU (it moves
               its shards to the GPU). On CPU (gloo) see `_patch_deepspeed_for_cpu`.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AutoModelForCausalLM


@dataclass(frozen=True)
class Context:
    checkpoint: str        # HF safetensors directory holding the seeded random-weight model
    config: object         # its config
    dtype: torch.dtype
    device: torch.device   # this rank's device
    rank: int
    world_size: int
    compile_options: dict | None = None  # fxtp-compile's inductor options over its defaults
    attn_implementation: str | None = None  # HF's attn_implementation for every impl (None: the model's default)


@dataclass
class Runner:
    generate: Callable  # (input_ids, attention_mask, new_tokens, streamer) -> LongTensor [B, P + new_tokens]
    memory: Callable[[], dict]  # after a generate: {"parameters": bytes, "cache": bytes or None} of this rank
    steps_ahead: int = 0  # decode steps generate has queued on the device when it streams a token


def hf_memory(model: torch.nn.Module) -> Callable[[], dict]:
    """Bytes of parameters this rank holds (the local shards of DTensors); HF's cache is not counted."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    parameters = sum(p.numel() * p.element_size() for p in local)
    return lambda: {"parameters": parameters, "cache": None}


def hf_generate(model, generate=None) -> Callable:
    """Greedy `generate` of an HF model, eos disabled so every call makes exactly `new_tokens` tokens."""
    generate = generate or model.generate

    def run(input_ids, attention_mask, new_tokens, streamer=None):
        return generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                        eos_token_id=None, pad_token_id=0, streamer=streamer)
    return run


def _load(ctx: Context, **kwargs):
    if ctx.attn_implementation:
        kwargs["attn_implementation"] = ctx.attn_implementation
    return AutoModelForCausalLM.from_pretrained(ctx.checkpoint, dtype=ctx.dtype, **kwargs).eval()


def hf_eager(ctx: Context) -> Runner:
    model = _load(ctx).to(ctx.device)  # not device_map=, which needs accelerate
    return Runner(hf_generate(model), hf_memory(model))


def hf_compile(ctx: Context) -> Runner:
    model = _load(ctx).to(ctx.device)
    model.generation_config.cache_implementation = "static"
    return Runner(hf_generate(model), hf_memory(model))


def hf_tp(ctx: Context) -> Runner:
    from transformers.distributed import DistributedConfig

    # HF picks the device from LOCAL_RANK and builds its mesh on the default process group
    model = _load(ctx, distributed_config=DistributedConfig(tp_plan="auto", tp_size=ctx.world_size))
    return Runner(hf_generate(model), hf_memory(model))


def _patch_deepspeed_for_cpu() -> None:
    """DeepSpeed builds a shared-memory all_reduce op for the CPU at first use, which needs a compiler
    toolchain; without it (build_shm_op returning None) its inference_all_reduce uses gloo."""
    # not `from deepspeed.comm import torch`: that name is torch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def deepspeed_autotp(ctx: Context) -> Runner:
    os.environ.setdefault("DS_ACCELERATOR", ctx.device.type)  # read when deepspeed is first imported
    import deepspeed

    if ctx.device.type == "cpu":
        _patch_deepspeed_for_cpu()
    engine = deepspeed.init_inference(_load(ctx), tensor_parallel={"tp_size": ctx.world_size}, dtype=ctx.dtype,
                                      replace_with_kernel_inject=False)
    model = engine.module
    return Runner(hf_generate(model, engine.generate), hf_memory(model))


# name -> (setup, runs on one device only)
PEERS = {
    "hf": (hf_eager, True),
    "hf-compile": (hf_compile, True),
    "hf-tp": (hf_tp, False),
    "deepspeed": (deepspeed_autotp, False),
}
