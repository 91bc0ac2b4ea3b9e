"""Time one training step (forward, backward, AdamW step) of a causal LM: HF eager and torch.compile'd
against fxtp's rank module (fxtp.compile(model, N, training=True)), eager and torch.compile'd.

    python benchmarks/training_speed.py --out training_speed.json       # one GPU, Llama-3-8B shape, 4 layers
    torchrun --nproc_per_node 2 benchmarks/training_speed.py --out tp2.json   # fxtp-n2 and fxtp-n2-compile
    python benchmarks/training_speed.py --device cpu --shape tiny:llama --dtype float32 --batch 2 --seq 16 \\
        --impl hf-eager,fxtp-n1                                          # CPU smoke run (the test)

Impls: hf-eager (the HF model), hf-compile (torch.compile of it), fxtp-nN (the rank module of
fxtp.compile(model, N, training=True), run eagerly) and fxtp-nN-compile (torch.compile of that
module). N is the number of processes (WORLD_SIZE under torchrun; with N > 1 the process group is
NCCL on CUDA, gloo on the CPU, and the HF impls are left out). Each impl builds the model anew on
the device (torch.manual_seed(--seed), HF's random init, --dtype weights; HF computes the loss in
float32), with AdamW over its parameters, and trains on one batch of --batch x --seq random tokens
(labels = the tokens, attention mask all ones). --warmup steps (the first, which includes
torch.compile's compilation, timed alone as first_step_s) then --steps timed steps, each between
synchronizations; ms_per_step is their median, tokens_per_s is batch x seq over it. peak_memory_gb
is torch.cuda.max_memory_allocated over the steps (reset after setup; the fxtp impls' setup drops
the HF model once the rank module holds its weights); weights_gb is what is allocated before the
first step. setup_s: building the model, and for fxtp compiling it and making the rank module.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.tiny_configs import real_config, tiny_config

GB = 2**30


def model_config(shape: str, layers: int | None):
    if shape.startswith("tiny:"):
        return tiny_config(shape[5:], **({"layers": layers} if layers else {}))
    return real_config(shape, layers)


def build(config, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """The model made on `device` directly (no copy of the weights through host memory), in train mode."""
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()


def parse_impl(name: str, world_size: int) -> tuple[str, bool]:
    """("hf" or "fxtp", whether torch.compile'd); refuses impls that do not fit the world size."""
    if name in ("hf-eager", "hf-compile"):
        if world_size > 1:
            raise SystemExit(f"{name} runs on one process; under {world_size} processes use fxtp-n{world_size}")
        return "hf", name == "hf-compile"
    match = re.fullmatch(r"fxtp-n(\d+)(-compile)?", name)
    if match is None:
        raise SystemExit(f"unknown impl {name!r}: hf-eager, hf-compile, fxtp-nN or fxtp-nN-compile")
    if int(match.group(1)) != world_size:
        raise SystemExit(f"{name} needs {match.group(1)} processes, this run has {world_size} "
                         f"(torchrun --nproc_per_node {match.group(1)})")
    return "fxtp", match.group(2) is not None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(kind: str, compiled: bool, config, args, dtype, device, rank: int, world_size: int):
    """(the module whose parameters train, a function of (ids, mask, labels) -> loss)."""
    model = build(config, dtype, device, args.seed)
    if kind == "hf":
        run = torch.compile(model) if compiled else model

        def forward(ids, mask, labels):
            return run(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        return model, forward
    tp = fxtp.compile(model, world_size, training=True)
    module = tp.module(rank, device=device)
    del tp, model  # the rank module owns its weights
    gc.collect()
    run = torch.compile(module) if compiled else module

    def forward(ids, mask, labels):
        return run(ids, mask, labels)[0]
    return module, forward


def measure(name: str, config, args, dtype, device, rank: int, world_size: int) -> dict:
    kind, compiled = parse_impl(name, world_size)
    synchronize(device)
    started = time.perf_counter()
    module, forward = setup(kind, compiled, config, args, dtype, device, rank, world_size)
    synchronize(device)
    setup_s = time.perf_counter() - started
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    mask, labels = torch.ones_like(ids), ids.clone()
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights_gb = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None

    def step() -> float:
        synchronize(device)
        started = time.perf_counter()
        loss = forward(ids, mask, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        losses.append(loss.item())
        return time.perf_counter() - started

    losses: list[float] = []
    first_step_s = step()
    for _ in range(args.warmup - 1):
        step()
    times = [step() for _ in range(args.steps)]
    ms = 1000 * statistics.median(times)
    row = dict(impl=name, world_size=world_size if kind == "fxtp" else 1, compiled=compiled,
               ms_per_step=ms, ms_mean=1000 * statistics.mean(times), ms_min=1000 * min(times),
               tokens_per_s=args.batch * args.seq / (ms / 1000), setup_s=setup_s, first_step_s=first_step_s,
               weights_gb=weights_gb,
               peak_memory_gb=torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
               parameters=sum(p.numel() for p in module.parameters()), first_loss=losses[0], last_loss=losses[-1])
    del module, forward, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", help="a real shape (fxtp.tiny_configs.REAL_SHAPES) or tiny:ARCH")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (0: the shape's own number)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--impl", default=None,
                        help="comma list (default: hf-eager,hf-compile,fxtp-n1,fxtp-n1-compile on one process, "
                             "fxtp-nN,fxtp-nN-compile on N)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first timed as first_step_s (>= 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="processes (default: WORLD_SIZE, set by torchrun)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    world_size = args.world_size
    if world_size != int(os.environ.get("WORLD_SIZE", "1")):
        parser.error(f"--world-size {world_size} needs torchrun --nproc_per_node {world_size}")
    impls = args.impl.split(",") if args.impl else \
        ["hf-eager", "hf-compile", "fxtp-n1", "fxtp-n1-compile"] if world_size == 1 else \
        [f"fxtp-n{world_size}", f"fxtp-n{world_size}-compile"]
    for name in impls:
        parse_impl(name, world_size)
    rank = 0
    device = torch.device(args.device)
    if world_size > 1:
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    elif device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    config = model_config(args.shape, args.layers or None)
    rows = []
    for name in impls:
        row = measure(name, config, args, dtype, device, rank, world_size)
        if world_size > 1:  # every rank's memory; the times are the group's (collectives keep them in step)
            every = [None] * world_size
            dist.all_gather_object(every, row)
            row["peak_memory_gb_per_rank"] = [r["peak_memory_gb"] for r in every]
            row["ms_per_step_per_rank"] = [r["ms_per_step"] for r in every]
        rows.append(row)
        if rank == 0:
            peak = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f}"
            print(f"{name:18s} {row['ms_per_step']:9.2f} ms/step {row['tokens_per_s']:10.0f} tokens/s  peak "
                  f"{peak} GB  setup {row['setup_s']:.1f} s  first step {row['first_step_s']:.1f} s  "
                  f"loss {row['first_loss']:.4f} -> {row['last_loss']:.4f}", flush=True)
    if rank == 0:
        print(f"{'impl':18s}{'ms/step':>10s}{'tokens/s':>11s}{'peak GB':>9s}{'setup s':>9s}{'first step s':>14s}")
        for row in rows:
            peak = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f}"
            print(f"{row['impl']:18s}{row['ms_per_step']:10.2f}{row['tokens_per_s']:11.0f}{peak:>9s}"
                  f"{row['setup_s']:9.1f}{row['first_step_s']:14.1f}")
        result = dict(shape=args.shape, layers=config.num_hidden_layers, dtype=args.dtype, batch=args.batch,
                      seq=args.seq, warmup=args.warmup, steps=args.steps, optimizer="AdamW", lr=args.lr,
                      world_size=world_size, results=rows,
                      device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      torch=torch.__version__, transformers=transformers.__version__)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
