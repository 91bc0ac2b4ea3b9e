"""Microseconds per decode-step attention call: cuDNN's (SDPA on the query rows folded per kv head,
what the compiled decode step runs with `compile={"decode_attention": False}`) against
fxtp::decode_attention, over its own choice of key splits and over fixed split counts, by batch,
cache length and GPUs sharing the heads; a step's worth of calls (one a layer) back to back in one
CUDA graph. It is what chose the kernel's split rule and its place as the default.

    python benchmarks/attention_latency.py --batch 1,8,32,64 --cache 256,1024,4096,8192 --ranks 1,2 --out attn.json

Every row also gives each kernel's max abs difference to SDPA. On the CPU (TRITON_INTERPRET=1,
tests only) the calls run eagerly in Triton's interpreter and the times mean nothing.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fxtp.kernels import decode_attention
from kernel_timing import as_cuda_graph, synchronizer, time_ms  # benchmarks/, beside this script


def attention_inputs(batch: int, heads: int, groups: int, cache: int, dim: int, dtype: torch.dtype,
                     device: torch.device) -> tuple:
    """A decode step's (query [b, hq, 1, d], key and value [b, hkv, 1, L, d], bool mask [b, 1, 1, L])
    halfway through its static cache: the later half of the keys is masked, as the unwritten part of
    the cache is (the kernels read it all the same)."""
    generator = torch.Generator().manual_seed(batch * cache + heads)
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key, value = (torch.randn(batch, groups, 1, cache, dim, generator=generator) for _ in range(2))
    mask = (torch.arange(cache) <= cache // 2).expand(batch, 1, 1, cache)
    return tuple(t.to(device, dtype) for t in (query, key, value)) + (mask.to(device),)


def calls_by_kernel(query, key, value, mask, split_counts: list[int]) -> dict:
    """{name: one call}: "sdpa" on inputs folded beforehand (as inductor feeds it), on CUDA also
    "cudnn" (SDPA held to cuDNN's kernel, which the decode step's profiles show), then fxtp's kernel
    over the splits it chooses ("fxtp") and over at most S splits for each S of `split_counts`
    ("fxtp/S")."""
    groups = key.size(1)
    folded = query.unflatten(1, (groups, -1)).flatten(2, 3)  # [b, hkv, n, d]
    folded_mask = mask.expand(-1, groups, folded.size(2), -1)
    keys, values = key.squeeze(2), value.squeeze(2)

    def sdpa():
        return F.scaled_dot_product_attention(folded, keys, values, folded_mask).unflatten(2, (-1, 1)).flatten(1, 2)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa()
    calls = {"sdpa": sdpa, **({"cudnn": cudnn} if query.is_cuda else {})}
    calls["fxtp"] = functools.partial(decode_attention.launch, query, key, value, mask, None)
    for count in split_counts:
        calls[f"fxtp/{count}"] = functools.partial(decode_attention.launch, query, key, value, mask, None,
                                                   splits=count)
    return calls


def per_call_timer(device: torch.device, layers: int, reps: int):
    """`call` -> microseconds a call: `layers` rounds of (flush L2, call), replayed as one CUDA graph on
    the GPU, less the flushes alone. The flush writes over twice the GPU's L2: in a decode step the
    GEMVs between two layers' attention stream far more than L2 holds, so the cache comes from HBM."""
    if device.type == "cuda":
        flush_l2 = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.uint8,
                               device=device).zero_
    else:
        flush_l2 = lambda: None  # noqa: E731

    def step_ms(call) -> float:
        def step():
            for _ in range(layers):
                flush_l2()
                call()
        return time_ms(as_cuda_graph(step) if device.type == "cuda" else step, reps, synchronizer(device))

    flush_ms = step_ms(lambda: None)
    return lambda call: (step_ms(call) - flush_ms) * 1e3 / layers


def measure(batch: int, heads: int, groups: int, cache: int, dim: int, split_counts: list[int],
            dtype: torch.dtype, device: torch.device, us_per_call) -> dict:
    query, key, value, mask = attention_inputs(batch, heads, groups, cache, dim, dtype, device)
    calls = calls_by_kernel(query, key, value, mask, split_counts)
    reference = calls["sdpa"]().float()
    row = {"batch": batch, "heads": heads, "kv_heads": groups, "cache": cache, "us_per_call": {}, "max_diff": {},
           "splits": {"fxtp": decode_attention.split_keys(cache, batch * groups,
                                                             decode_attention.target_programs(device))[1],
                      **{f"fxtp/{c}": decode_attention.chunk_keys(cache, c)[1] for c in split_counts}}}
    for name, call in calls.items():
        try:
            row["max_diff"][name] = (call().float() - reference).abs().max().item()
        except RuntimeError as error:  # cuDNN declining these shapes: the row says so
            row["max_diff"][name], row["us_per_call"][name] = None, None
            row.setdefault("errors", {})[name] = str(error).splitlines()[0]
            continue
        row["us_per_call"][name] = us_per_call(call)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8,32,64")
    parser.add_argument("--cache", default="256,1024,4096", help="static cache lengths (fxtp rounds up to 256)")
    parser.add_argument("--ranks", default="1,2", help="GPUs sharing the heads: each holds 1/N of them")
    parser.add_argument("--heads", type=int, default=32, help="query heads of the whole model (Llama-3-8B: 32)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32, help="calls a step, one a layer")
    parser.add_argument("--splits", default="1,2,4,8,16,32",
                        help="fxtp kernel variants over at most this many splits of the keys, beside its own choice")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=None, help="JSON file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU here: it times CUDA kernels (--device cpu runs Triton's interpreter, for tests)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu needs TRITON_INTERPRET=1 in the environment (Triton's interpreter)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ranks, batches, caches, split_counts = ([int(v) for v in values.split(",")] for values in
                                            (args.ranks, args.batch, args.cache, args.splits))
    for n in ranks:
        if args.heads % n or args.kv_heads % n:
            parser.error(f"--ranks {n} does not divide {args.heads} heads and {args.kv_heads} kv heads")
    us_per_call = per_call_timer(device, args.layers, args.reps)
    rows = [{"ranks": n, **measure(batch, args.heads // n, args.kv_heads // n, cache, args.head_dim, split_counts,
                                   dtype, device, us_per_call)}
            for n, batch, cache in itertools.product(ranks, batches, caches)]
    names = list(rows[0]["us_per_call"])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"{device_name}, {args.dtype}, us per call (max abs diff to sdpa); fxtp: over the splits it "
          f"chooses (how many: 'its splits'), fxtp/S: over at most S")
    print("| N | batch | cache | its splits | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for row in rows:
        cells = [f"{row['us_per_call'][name]:.2f} ({row['max_diff'][name]:.0e})"
                 if row["us_per_call"][name] is not None else "declined" for name in names]
        print(f"| {row['ranks']} | {row['batch']} | {row['cache']} | {row['splits']['fxtp']} | "
              + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
