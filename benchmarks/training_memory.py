"""Training memory per rank at tensor parallelism N against one process: the bytes of the parameters,
their gradients and AdamW's state, for a Llama trained one step.

    python benchmarks/training_memory.py [--world-size 2] [--out training_memory.json]
    python benchmarks/training_memory.py --hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 \\
        --vocab 256 --seq 16   # a tiny Llama (the test)

Every row is its own CPU process with one torch thread. Each TP rank is a gloo process
(fxtp.runtime.rank_processes.run_ranks) that builds the model (the same seed on every rank),
compiles it with fxtp.compile(model, N, training=True), takes tp.module(rank) and runs one forward,
backward and AdamW step on --batch x --seq tokens. The baseline is one process that trains the HF
model itself the same way. The bytes are counted from the tensors (numel x element size), after the
step: the parameters, every .grad, and every tensor in optimizer.state (exp_avg, exp_avg_sq, step);
`ratio` is a rank's total over the one process's. Peak RSS (VmHWM) is given twice: over the whole
process, which includes the unsharded model every rank builds and compiles from, and over the step
alone, reset (/proc/self/clear_refs) once the HF model and the program are dropped and only the
rank's module is left (how much of the freed memory the allocator returns to the OS varies).
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import transformers

import fxtp
from fxtp.runtime.rank_processes import run_ranks
from fxtp.tiny_configs import tiny_model

MB = 2**20


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux's clear_refs 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(dims: dict) -> torch.nn.Module:
    return tiny_model("llama", seed=0, hidden=dims["hidden"], layers=dims["layers"], heads=dims["heads"],
                      kv_heads=dims["kv_heads"], intermediate=dims["intermediate"], vocab=dims["vocab"],
                      positions=dims["positions"]).train()


def batch_of(dims: dict, batch: int, seq: int):
    ids = torch.randint(3, dims["vocab"], (batch, seq), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids), ids.clone()


def train_one_step(rank: int, world_size: int, dims: dict, batch: int, seq: int) -> dict:
    """One forward, backward and AdamW step; world_size 0 is the HF model alone. The bytes after it."""
    rss_start = status_mb("VmRSS")  # torch, transformers and fxtp imported
    started = time.perf_counter()
    model = build(dims)
    if world_size:
        tp = fxtp.compile(model, world_size, training=True)
        module = tp.module(rank)
        del tp, model  # the rank keeps its own shards only
        forward = module
    else:
        module = model

        def forward(ids, mask, labels):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss, None
    gc.collect()
    setup_s = time.perf_counter() - started
    rss_before_step, peak_before_step = status_mb("VmRSS"), status_mb("VmHWM")
    reset = reset_peak_rss()
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    loss, _ = forward(*batch_of(dims, batch, seq))
    loss.backward()
    optimizer.step()
    step_s = time.perf_counter() - started
    params = list(module.parameters())
    row = dict(param_bytes=tensor_bytes(params),
               grad_bytes=tensor_bytes(p.grad for p in params if p.grad is not None),
               optimizer_bytes=tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                                            if torch.is_tensor(v)),
               buffer_bytes=tensor_bytes(module.buffers()))
    row["total_bytes"] = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
    row.update(parameters=len(params), without_grad=sum(p.grad is None for p in params), loss=loss.item(),
               peak_rss_mb=round(max(peak_before_step, status_mb("VmHWM")), 1),
               rss_start_mb=round(rss_start, 1), rss_before_step_mb=round(rss_before_step, 1),
               step_peak_rss_mb=round(status_mb("VmHWM"), 1) if reset else None,
               setup_s=round(setup_s, 2), step_s=round(step_s, 2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900, help="seconds for each run of processes")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    dims = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                intermediate=args.intermediate, vocab=args.vocab, positions=max(128, args.seq))
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build(dims).parameters())
    print(f"Llama {dims}: {parameters / 1e6:.1f} M parameters, {parameters * 4 / MB:.1f} MB in float32", flush=True)
    one = run_ranks(train_one_step, 1, 0, dims, args.batch, args.seq, timeout=args.timeout)[0]
    ranks = run_ranks(train_one_step, args.world_size, args.world_size, dims, args.batch, args.seq,
                      timeout=args.timeout)
    for rank, row in enumerate(ranks):
        row["rank"] = rank
        row["ratio"] = row["total_bytes"] / one["total_bytes"]
        row["loss_diff"] = abs(row["loss"] - one["loss"])
    header = f"{'':14s}{'params MB':>10s}{'grads MB':>10s}{'AdamW MB':>10s}{'total MB':>10s}{'ratio':>7s}" \
             f"{'peak RSS MB':>13s}{'step peak RSS MB':>18s}"
    print(header)
    for label, row in [("1 process", {**one, "ratio": 1.0})] + \
            [(f"rank {r['rank']} of {args.world_size}", r) for r in ranks]:
        step_peak = "-" if row["step_peak_rss_mb"] is None else f"{row['step_peak_rss_mb']:.0f}"
        print(f"{label:14s}{row['param_bytes'] / MB:10.1f}{row['grad_bytes'] / MB:10.1f}"
              f"{row['optimizer_bytes'] / MB:10.1f}{row['total_bytes'] / MB:10.1f}{row['ratio']:7.3f}"
              f"{row['peak_rss_mb']:13.0f}{step_peak:>18s}")
    max_ratio = max(row["ratio"] for row in ranks)
    print(f"largest rank / 1 process: {max_ratio:.4f} (goal <= 0.52); "
          f"loss differs from 1 process by {max(r['loss_diff'] for r in ranks):.2e}")
    result = dict(model=dict(arch="llama", **dims, parameters=parameters), world_size=args.world_size,
                  batch=args.batch, seq=args.seq, dtype="float32", optimizer="AdamW", one_process=one, ranks=ranks,
                  max_ratio=max_ratio, torch=torch.__version__, transformers=transformers.__version__)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
