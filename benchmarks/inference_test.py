"""Greedy-decoding latency of fxtp against HF eager, HF + torch.compile, HF tp_plan and DeepSpeed
AutoTP, in one process group, on the same seeded random-weight model and the same prompts.

    # N = 2 (the world size is N for fxtp, hf-tp and deepspeed; hf and hf-compile use one GPU)
    torchrun --nproc_per_node 2 benchmarks/inference_test.py --shape llama3-8b --dtype bfloat16 \\
        --batch 1,32 --prompt-len 128 --gen-len 128 --impl fxtp,fxtp-compile,hf-tp,deepspeed --out n2.json
    # N = 1, with the one-GPU baselines
    python benchmarks/inference_test.py --shape llama3-8b --batch 1,32 \\
        --impl hf,hf-compile,fxtp,fxtp-compile --out n1.json
    # CPU (gloo), a tiny model
    torchrun --nproc_per_node 2 benchmarks/inference_test.py --device cpu --shape tiny:llama \\
        --dtype float32 --batch 1,3 --prompt-len 16 --gen-len 32 --impl fxtp,hf-tp,deepspeed

The model is built once on rank 0 (`torch.manual_seed(--seed)`, HF's random init) and saved as a
safetensors checkpoint (reused by later runs); every impl loads it: fxtp reads only its rank's
slices (`tp.generator(rank, checkpoint=...)`), hf-tp loads it with its tp_plan. One-GPU impls
(hf, hf-compile, and fxtp-n1 / fxtp-compile-n1: fxtp compiled for one device) run on rank 0 while
the other ranks wait, and only with --single-too when N > 1. Then every row of N > 1 is also given
as a fraction of the fastest one-device row at its batch size (lines under the table, x_best_1gpu
in the JSON), all measured in one run on one machine.

Timing: a streamer (`put`/`end`, as HF's generate calls it) stamps the time at each put, when the
tokens are on the host (HF's generate copies them with `.cpu()`, fxtp's generator waits for a
non-blocking copy after it has queued the next step): once for the prompt, then once per generated
token. The first interval is the prefill
(with the first token), the others are decode steps; p50..p999 pool the decode steps of all trials
(p999 needs >= 1000 of them to mean anything). tok/s = batch * gen_len / wall time of generate.

Derived numbers (per rank; "N" is the impl's number of devices):
- bytes a decode step reads: weights / N + KV cache, where weights excludes an untied input
  embedding (a step reads one row per sequence of it) and the KV cache is
  2 * layers * kv_heads_local * head_dim * (prompt_len + gen_len / 2) * batch (its mean length);
  kv_heads_local = kv_heads / N if N divides it, else all of them (replicated). MoE counts every
  expert. This is the ideal split, the same for every impl at a given N.
- HBM floor = those bytes / peak HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s, --hbm-bandwidth);
  HBM frac = HBM floor / decode p50. GB/s = those bytes / decode p50.
- TFLOPs = 2 * weights * batch / decode p50 (all ranks together; attention FLOPs left out).
- AR ms (N > 1): one decode step's all_reduces of [batch, hidden] (2 per layer, 1 for the
  embedding) back to back in one CUDA graph, the fastest of NCCL, symmetric memory's
  one_shot_all_reduce and fxtp's push_all_reduce (all in the JSON): the floor of the communication.
  On the CPU: gloo, eager.
- x floor = decode p50 / (HBM floor + AR ms): 1.0 would be a step that only reads its bytes at
  peak bandwidth and all-reduces.
- setup / 1st generate s: building the impl (loading, for fxtp also capture and planning), and the
  first warmup generate of each batch size, which includes what the impl compiles and captures.

--profile (CUDA) counts the kernels (and memcpy/memset) of one decode step on every rank (a list
by rank in the JSON: a rank that waits in its all_reduces for a slower one shows it there) with
torch.profiler, kernels in CUDA graph replays included: one more generate, profiled from its first
generated token to the end, over the decode steps it launched after that: gen_len - 1, less the
one fxtp's generate has already queued when it streams a token. "busy" is the time at least one of
them runs (kernels that overlap, as under programmatic dependent launch, count once): p50 - busy is
time the GPU spent with no kernel (launch gaps, the host's part of a step), which a faster kernel
does not remove.

"tuned" in the JSON: per rank, the config of every Triton kernel inductor compiled for the impl
(block sizes and warps, as coordinate descent left them), read after its warmup: inductor tunes a
kernel on its first run, so compilations of the same options can differ.

Correctness: the first --check-tokens greedy tokens of every impl against a reference: the first
impl in --impl at N = 1, HF eager on rank 0's GPU at N > 1 (with --no-reference, the first impl
there too: --compile-options variants and --single-too rows against the first row). The check is
token-exact; "match" is the number of leading tokens equal in every row. bf16 sums are rounded in
another order by each impl, so near-tied logits of random weights may pick other tokens after a
few steps (benchmarks/nccl_check.py saw 5 of 32 at N=2); --dtype float32 checks exactly.

The code is in modules beside this script in benchmarks/ (on the path as the script runs): this one
reads the command line and prints the table; decode_impls.py names the impls (fxtp's, and the
baselines of peers.py); random_model.py makes the config, the checkpoint and the prompts;
impl_rows.py times every impl into its rows and checks their tokens, with decode_timing.py (the
streamer, the trials), decode_floor.py (the derived numbers) and kernel_profile.py (--profile,
"tuned"); max_batch.py is --find-max-batch; process_group.py and kernel_timing.py are shared with
the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata

import torch
import torch.distributed as dist

from decode_impls import IMPLS  # benchmarks/, beside this script
from decode_timing import PERCENTILES
from fxtp.decode.options import requested
from fxtp.tiny_configs import REAL_SHAPES
from impl_rows import time_impls, write_json
from kernel_profile import kernel_table
from max_batch import MAX_BATCH_LIMIT, find_max_batch
from peers import Context
from process_group import barrier, init_distributed
from random_model import ensure_checkpoint, model_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", help=f"one of {', '.join(REAL_SHAPES)}, or tiny:ARCH")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", default="1", help="comma list of batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="untimed generate calls per impl and batch")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--impl", default="hf,hf-compile,fxtp,fxtp-compile,hf-tp,deepspeed",
                        help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--single-too", action="store_true",
                        help="run the one-device impls (hf, hf-compile, fxtp-n1, fxtp-compile-n1) on rank 0 "
                             "when N > 1")
    parser.add_argument("--no-reference", action="store_true",
                        help="at N > 1, skip the HF eager reference: the first impl's tokens are the reference "
                             "instead, as at N = 1")
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--hbm-bandwidth", type=float, default=None, help="peak HBM bytes/s (default: by GPU name)")
    parser.add_argument("--checkpoint-dir", default=None, help="where the random-weight checkpoint is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--find-max-batch", metavar="IMPL", default=None,
                        help=f"instead of timing: double the batch from the largest --batch until IMPL runs out of "
                             f"memory (at most {MAX_BATCH_LIMIT}), then bisect (--max-batch-halvings)")
    parser.add_argument("--max-batch-halvings", type=int, default=3,
                        help="with --find-max-batch: bisections after the first batch that does not fit")
    parser.add_argument("--compile-options", type=json.loads, default=[], metavar="JSON",
                        help="fxtp-compile's and fxtp-compile-n1's options over their defaults: fields of "
                             "fxtp.DecodeOptions (fxtp/decode/options.py), e.g. '{\"push_all_reduce\": false}' or "
                             "'{\"inductor\": {\"max_autotune\": true}}'; a list of them runs each of the two once per "
                             "entry, side by side (an A/B on one machine): '[{}, {\"coordinate_descent_tuning\": false}]'")
    parser.add_argument("--interleave", action="store_true",
                        help="with a list of --compile-options: set up every variant first, then time them in "
                             "turns, trial by trial, so that the machine's drift falls on all of them alike "
                             "(their weights are all in memory at once; peak memory is not reported)")
    parser.add_argument("--attn-implementation", default=None, metavar="NAME",
                        help="HF's attn_implementation for every impl, e.g. eager (default: the model's, sdpa)")
    parser.add_argument("--profile", action="store_true",
                        help="also count and time the kernels of one decode step (torch.profiler, CUDA only)")
    parser.add_argument("--out", default="results.json")
    args = parser.parse_args()
    if args.profile and args.device != "cuda":
        parser.error("--profile counts CUDA kernels: use it with --device cuda")
    args.batch = [int(b) for b in args.batch.split(",")]
    args.impl = args.impl.split(",")
    variants = args.compile_options if isinstance(args.compile_options, list) else [args.compile_options]
    if not all(isinstance(v, dict) for v in variants):
        parser.error("--compile-options takes a JSON object of fxtp.DecodeOptions fields, or a list of them")
    for variant in variants:
        try:
            requested(variant)
        except (TypeError, ValueError) as error:
            parser.error(f"--compile-options {json.dumps(variant)}: {error}")
    args.compile_options = variants
    unknown = [name for name in args.impl + [args.find_max_batch] if name and name not in IMPLS]
    if unknown:
        parser.error(f"unknown impl {', '.join(unknown)}; known: {', '.join(IMPLS)}")
    return args


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list) -> str:
    gb = 1e9
    lines = ["| impl | N | batch | prefill ms | p50 | p90 | p95 | p99 | p999 | tok/s | param GB/rank | peak GB/rank "
             "| TFLOPs | GB/s | HBM frac | AR ms | x floor | setup / 1st generate s | tokens vs ref |", "|" + "---|" * 19]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['world_size']} | | error: {r['error']} |" + " |" * 15)
            continue
        d, peaks = r["decode_ms"], [p for p in r["peak_bytes"] if p is not None]
        match = f"{r['match']}/{r['checked']}" if r.get("match") is not None else "-"
        lines.append(" | ".join([
            f"| {r['impl']}", str(r["world_size"]), str(r["batch"]), fmt(r["prefill_ms"]),
            *(fmt(d[k], 3) for k in PERCENTILES), fmt(r["tokens_per_s"], 1), fmt(max(r["param_bytes"]) / gb),
            fmt(max(peaks) / gb if peaks else None), fmt(r["tflops"]), fmt(r["gb_per_s"], 0),
            fmt(r["hbm_fraction"]), fmt(r["ar_ms"], 3), fmt(r["x_floor"]),
            f"{fmt(r['setup_s'], 1)} / {fmt(r['first_generate_s'], 1)}", match + ("" if r["ranks_identical"] else " (ranks differ)")
            + ("" if r.get("trials_identical", True) else " (trials differ)"),
        ]) + " |")
    return "\n".join(lines)


def one_device_ratio_lines(rows: list) -> list[str]:
    return [f"{row['impl']} N={row['world_size']} batch {row['batch']}: {row['x_best_1gpu']:.3f}x of the fastest "
            f"1-GPU row ({row['best_1gpu']}, same run)" for row in rows if "x_best_1gpu" in row]


def versions() -> dict:
    found = {}
    for package in ("torch", "transformers", "accelerate", "deepspeed"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def main() -> None:
    args = parse_args()
    rank, world, device = init_distributed(args.device)
    dtype = getattr(torch, args.dtype)
    config = model_config(args.shape, args.layers)
    ctx = Context(ensure_checkpoint(args, config, dtype, device), config, dtype, device, rank, world,
                  attn_implementation=args.attn_implementation)
    meta = {"shape": args.shape, "layers": config.num_hidden_layers, "dtype": args.dtype, "world_size": world,
            "prompt_len": args.prompt_len, "gen_len": args.gen_len, "warmup": args.warmup, "trials": args.trials,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "versions": versions(), "checkpoint": ctx.checkpoint, "compile_options": args.compile_options,
            "interleave": args.interleave, "attn_implementation": args.attn_implementation}
    if args.find_max_batch:
        best = find_max_batch(args.find_max_batch, ctx, args)
        if rank == 0:
            result = {"meta": meta, "impl": args.find_max_batch, "max_batch": best}
            print(json.dumps(result))
            write_json(args.out, result)
    else:
        rows = time_impls(ctx, args, meta)
        if rank == 0:
            print(table(rows))
            ratio_lines = one_device_ratio_lines(rows)
            if ratio_lines:
                print("\n" + "\n".join(ratio_lines))
            if args.profile:
                print("\n" + kernel_table(rows))
            if meta["skipped"]:
                print(f"\nskipped at N={world} (one-GPU impls; --single-too runs them on rank 0): "
                      f"{', '.join(meta['skipped'])}")
            print(f"\nreference: {meta['reference']}; {meta['check']}; JSON: {args.out}")
    barrier(device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
