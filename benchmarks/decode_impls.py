"""Every impl inference_test.py can time, by its --impl name: fxtp's (sharded over the process group,
or compiled for one device) and the baselines of peers.py, each set up from the same checkpoint
behind peers.py's Runner."""
from __future__ import annotations

import dataclasses
import gc
import sys

import torch
from transformers import AutoModelForCausalLM

import fxtp
from peers import PEERS, Context, Runner  # benchmarks/peers.py, beside this script


def fxtp_runner(ctx: Context, compile) -> Runner:
    attention = {"attn_implementation": ctx.attn_implementation} if ctx.attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ctx.config, dtype=ctx.dtype, **attention).eval()
    tp = fxtp.compile(model, ctx.world_size, capture_on_first_use=True)  # it generates only: no forward export
    gen = tp.generator(ctx.rank, device=ctx.device, checkpoint=ctx.checkpoint, compile=compile)
    if compile is not False and ctx.rank == 0:
        print(f"[inference_test] fxtp-compile options: {gen.compile_options}", file=sys.stderr, flush=True)

    def generate(input_ids, attention_mask, new_tokens, streamer=None):
        return gen.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=[], streamer=streamer)  # [] never stops; None is the model's eos
    return Runner(generate, gen.memory, steps_ahead=1)  # fxtp/runtime/generation.py queues a step, then streams


def on_one_device(ctx: Context) -> Context:
    return dataclasses.replace(ctx, rank=0, world_size=1)


# name -> (setup, runs on one device only)
IMPLS = {
    **PEERS,
    "fxtp": (lambda ctx: fxtp_runner(ctx, compile=False), False),
    "fxtp-compile": (lambda ctx: fxtp_runner(ctx, compile=ctx.compile_options or True), False),
    # fxtp compiled for one device, so that a run at N > 1 (--single-too) also times fxtp's own 1-GPU step
    "fxtp-n1": (lambda ctx: fxtp_runner(on_one_device(ctx), compile=False), True),
    "fxtp-compile-n1": (lambda ctx: fxtp_runner(on_one_device(ctx), compile=ctx.compile_options or True), True),
}
COMPILED = ("fxtp-compile", "fxtp-compile-n1")  # the impls that take --compile-options


def free_memory(device: torch.device) -> None:
    """Drops what an impl (or the model built for the checkpoint) left on the device before the next is set up."""
    gc.collect()
    torch._dynamo.reset()  # drops compiled graphs and their CUDA graph pools
    if device.type == "cuda":
        torch.cuda.empty_cache()
