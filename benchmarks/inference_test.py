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
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.tiny_configs import REAL_SHAPES, real_config, tiny_config
from fxtp.decode.options import DecodeOptions, requested, resolve
from fxtp.decode.symmetric_memory import symmetric_memory_works
from fxtp.runtime.rank_processes import free_port
from fxtp.capture.static_cache import cache_shape
from peers import PEERS, Context, Runner  # benchmarks/peers.py, beside this script

PERCENTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}
HBM_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12))  # B/s
MAX_BATCH_LIMIT = 4096


def fxtp_runner(ctx: Context, compile) -> Runner:
    attention = {"attn_implementation": ctx.attn_implementation} if ctx.attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ctx.config, dtype=ctx.dtype, **attention).eval()
    tp = fxtp.compile(model, ctx.world_size)
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


class StepTimer:
    """An HF-style streamer that stamps the time of every `put`: when the tokens reach the host.
    It does not sync the device, which would also wait for a step the generator has already queued."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.device.type != "cpu":
            raise RuntimeError(f"the streamer got tokens on {value.device}; a stamp means they reached the host")
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def prefill(self) -> float:
        return self.times[1] - self.times[0]

    @property
    def decode(self) -> list[float]:
        return [b - a for a, b in zip(self.times[1:], self.times[2:])]


@dataclass(frozen=True)
class ModelStats:
    weights: int  # parameters a decode step reads: all but an untied input embedding
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int

    @classmethod
    def of(cls, config) -> "ModelStats":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embedding
        text = config.get_text_config(decoder=True)
        _, kv_heads, _, head_dim = cache_shape(config, 1, 1)  # as fxtp's static cache holds them
        return cls(weights=sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel()),
                   layers=text.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim, hidden=text.hidden_size)

    def decode_bytes(self, batch: int, context: float, ranks: int, dtype_bytes: int) -> float:
        """Bytes one decode step reads on each of `ranks` ranks, ideally split."""
        kv_local = self.kv_heads // ranks if self.kv_heads % ranks == 0 else self.kv_heads
        kv = 2 * self.layers * kv_local * self.head_dim * context * batch
        return (self.weights / ranks + kv) * dtype_bytes


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


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python`: a group of one, so every impl takes the same path
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # an hour: the other ranks wait while rank 0 compiles and times a one-GPU impl
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size(), device


def barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def model_config(shape: str, layers: int | None):
    if shape.startswith("tiny:"):
        return tiny_config(shape[5:], **({"layers": layers} if layers else {}))
    return real_config(shape, layers)


def ensure_checkpoint(args, config, dtype: torch.dtype, device: torch.device) -> str:
    """The seeded random-weight model as a HF checkpoint, written once by rank 0 and kept for later runs."""
    name = f"{args.shape.replace(':', '-')}-L{config.num_hidden_layers}-{args.dtype}-seed{args.seed}"
    path = args.checkpoint_dir or os.path.join(tempfile.gettempdir(), "fxtp_bench", name)
    complete = os.path.join(path, "COMPLETE")
    if dist.get_rank() == 0 and not os.path.exists(complete):
        torch.manual_seed(args.seed)
        with device:  # HF's random init is much faster on a GPU; every impl then loads the same file
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(path)
        open(complete, "w").close()
        del model
        free_memory(device)
    barrier(device)
    return path


def make_prompt(batch: int, length: int, vocab: int, seed: int, device: torch.device):
    generator = torch.Generator().manual_seed(seed * 100003 + batch)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)  # 0-2: pad/bos/eos in tiny configs
    return ids.to(device), torch.ones_like(ids).to(device)


def hbm_bandwidth(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((bandwidth for key, bandwidth in HBM_BANDWIDTH if key in name), None)


def allreduce_ms(batch: int, stats: ModelStats, dtype: torch.dtype, device: torch.device, reps: int = 20) -> dict:
    """Time of one decode step's all_reduces ([batch, hidden], 2 per layer + the embedding's), back to
    back, by implementation: {"nccl": ms, "one_shot": ms, "push": ms} on CUDA (replays of a CUDA graph
    holding them; one_shot and fxtp's push where symmetric memory works), {"gloo": ms} on the CPU."""
    calls, group_name = 2 * stats.layers + 1, dist.group.WORLD.group_name
    x = torch.zeros(batch, stats.hidden, dtype=dtype, device=device)
    back_to_back = lambda: [dist.all_reduce(x) for _ in range(calls)]  # noqa: E731
    if device.type != "cuda":
        return {"gloo": time_ms(back_to_back, reps, synchronizer(device))}
    steps = {"nccl": back_to_back}
    if symmetric_memory_works(group_name, device):
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(batch, stats.hidden, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group_name)
        steps["one_shot"] = lambda: [torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", group_name)
                                     for _ in range(calls)]
        steps["push"] = lambda: [torch.ops.fxtp.push_all_reduce(x, group_name) for _ in range(calls)]
    return {name: time_ms(as_cuda_graph(step), reps, synchronizer(device)) for name, step in steps.items()}


def as_cuda_graph(step):
    step()  # NCCL communicators and symmetric-memory handles exist before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph.replay


def time_ms(step, reps: int, sync) -> float:
    step()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    return (time.perf_counter() - start) / reps * 1e3


def add_turn_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a kernel microbenchmark that replays CUDA graphs in turns (`fastest_in_turns`)."""
    parser.add_argument("--reps", type=int, default=40, help="replays a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None, help="JSON file")


def step_inductor_options(store_gemv_inputs: bool = False) -> dict:
    """The inductor options of a 1-GPU decode step (coordinate descent, PDL; the post-grad pass of
    passes/decode/store_gemv_inputs.py if `store_gemv_inputs`), without fxtp's rewrites of the step's
    graph: a kernel microbenchmark compiles with them as the step does."""
    return resolve(DecodeOptions(store_gemv_inputs=store_gemv_inputs), 1, symmetric_memory=False).inductor_options()


def fastest_in_turns(replays: dict, reps: int, rounds: int, calls: int) -> dict:
    """{name: us a call}: each replay (a CUDA graph of `calls` calls) timed `reps` times a round, the
    replays taking turns for `rounds` rounds (drift falls on all alike); the fastest round of each."""
    fastest = {}
    for _ in range(rounds):
        for name, replay in replays.items():
            us = time_ms(replay, reps, torch.cuda.synchronize) * 1e3 / calls
            fastest[name] = min(us, fastest.get(name, us))
    return fastest


def measure(runners: list[Runner], ids, mask, args, device: torch.device) -> list[tuple[torch.Tensor, dict]]:
    """Warm up each runner, then time `trials` greedy generations of `gen_len` tokens each, the runners
    taking turns trial by trial (--interleave), so that the machine's drift falls on all of them.
    first_generate_s is the first warmup's wall time: it includes whatever an impl compiles and
    captures for this batch size. Peak memory is given for a runner timed alone only. trials_identical:
    whether every trial generated the same tokens (the tokens returned are the last trial's)."""
    first_generate, tuned, loaded = [], [], set()
    for runner in runners:
        for i in range(args.warmup):
            start = time.perf_counter()
            runner.generate(ids, mask, args.gen_len, StepTimer())
            if i == 0:
                first_generate.append(time.perf_counter() - start)
        tuned.append(tuned_kernels(loaded))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = [{"prefill": [], "decode": [], "wall": []} for _ in runners]
    tokens, repeatable = [None] * len(runners), [True] * len(runners)
    for _ in range(args.trials):
        for i, runner in enumerate(runners):
            timer = StepTimer()
            start = time.perf_counter()
            generated = runner.generate(ids, mask, args.gen_len, timer)
            synchronizer(device)()
            repeatable[i] &= tokens[i] is None or torch.equal(generated, tokens[i])
            tokens[i] = generated
            timed[i]["wall"].append(time.perf_counter() - start)
            timed[i]["prefill"].append(timer.prefill)
            timed[i]["decode"].extend(timer.decode)
    alone = device.type == "cuda" and len(runners) == 1
    results = []
    for i, times in enumerate(timed):
        decode_s = torch.tensor(times["decode"], dtype=torch.float64)
        results.append((tokens[i].cpu(), {
            "prefill_ms": sorted(times["prefill"])[len(times["prefill"]) // 2] * 1e3,
            "decode_ms": {key: decode_s.quantile(q).item() * 1e3 for key, q in PERCENTILES.items()},
            "decode_steps": len(times["decode"]),
            "tokens_per_s": ids.shape[0] * args.gen_len / (sum(times["wall"]) / len(times["wall"])),
            "peak_bytes": torch.cuda.max_memory_allocated(device) if alone else None,
            "first_generate_s": first_generate[i] if first_generate else None,
            "trials_identical": repeatable[i],
            "tuned": tuned[i],
        }))
    return results


def tuned_kernels(loaded: set) -> dict:
    """{kernel name: its config} of the Triton kernels in the modules inductor has loaded since `loaded`
    (ids of modules seen before, updated), as they run now: tuned on their first run. A module that a
    later variant shares with an earlier one is listed under the earlier one only."""
    from torch._inductor.codecache import PyCodeCache

    configs = {}
    for module in PyCodeCache.modules:
        if id(module) in loaded:
            continue
        loaded.add(id(module))
        for name, kernel in vars(module).items():
            launchers = getattr(kernel, "launchers", None)
            if name.startswith("triton_") and launchers:
                config = launchers[0].config
                configs[name] = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return configs


def decode_kernels(runner: Runner, ids, mask, gen_len: int, top: int = 15) -> dict:
    """This rank's kernels of one decode step (--profile), from a generate profiled from its first
    token on: {"count": kernels per step, "busy_ms": time per step with one of them running, "top":
    [[name, count per step, ms per step], ...] the `top` longest in total}."""
    profiled = DecodeProfile()
    runner.generate(ids, mask, gen_len, profiled)
    steps = gen_len - 1 - runner.steps_ahead  # the steps queued when profiling starts ran before it
    ranked = sorted(profiled.totals.items(), key=lambda item: -item[1][1])
    return {"count": sum(count for count, _ in profiled.totals.values()) / steps,
            "busy_ms": profiled.busy_us / steps / 1e3,
            "top": [[name, round(count / steps, 3), round(us / steps / 1e3, 5)] for name, (count, us) in ranked[:top]]}


class DecodeProfile:
    """A streamer that profiles the decode steps only: from the first generated token (the second
    `put`; the first is the prompt), once the device has finished what was queued by then, to `end`.
    `totals` is then {kernel name: (launches, microseconds)}, `busy_us` the microseconds in which at
    least one kernel ran."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CUDA])
        self.puts = 0
        self.totals: dict[str, tuple[int, float]] = {}
        self.busy_us = 0.0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            torch.cuda.synchronize()
            self.profiler.start()

    def end(self) -> None:
        torch.cuda.synchronize()
        self.profiler.stop()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            self.profiler.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        kernels = [event for event in events if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        for event in kernels:
            count, us = self.totals.get(event["name"], (0, 0.0))
            self.totals[event["name"]] = (count + 1, us + event["dur"])
        self.busy_us = union_length([(event["ts"], event["ts"] + event["dur"]) for event in kernels])


def union_length(intervals: list) -> float:
    """The length of the union of [start, end) intervals."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


def derived(row: dict, stats: ModelStats, args, dtype: torch.dtype, bandwidth: float | None) -> dict:
    latency_ms = row["decode_ms"]["p50"]
    read = stats.decode_bytes(row["batch"], args.prompt_len + args.gen_len / 2, row["world_size"],
                              torch.finfo(dtype).bits // 8)
    hbm_ms = read / bandwidth * 1e3 if bandwidth else None
    floor_ms = hbm_ms + (row["ar_ms"] or 0) if hbm_ms else None
    return {"decode_bytes_per_rank": read, "gb_per_s": read / latency_ms / 1e6,
            "tflops": 2 * stats.weights * row["batch"] / latency_ms / 1e9,
            "hbm_floor_ms": hbm_ms, "hbm_fraction": hbm_ms / latency_ms if hbm_ms else None,
            "floor_ms": floor_ms, "x_floor": latency_ms / floor_ms if floor_ms else None}


def run_impl(name: str, runs: list[tuple[str, Context]], args, prompts: dict, stats: ModelStats,
             extra: dict) -> tuple[list, dict]:
    """Rows and tokens ({label: {batch: [B, P + G]}}) of one impl over every batch size, once per
    (row label, context) of `runs`: its runners are set up together and timed in turns."""
    setup, single = IMPLS[name]
    runners, setup_s = [], []
    for _, ctx in runs:
        start = time.perf_counter()
        runners.append(setup(ctx))
        setup_s.append(time.perf_counter() - start)
    ctx = runs[0][1]
    ranks = 1 if single else ctx.world_size
    gather = (lambda value: [value]) if single else _all_gather
    rows, tokens = [], {label: {} for label, _ in runs}
    for batch, (ids, mask) in prompts.items():
        measured = measure(runners, ids, mask, args, ctx.device)
        for (label, _), runner, seconds, (generated, numbers) in zip(runs, runners, setup_s, measured):
            tokens[label][batch] = generated
            memory = runner.memory()
            row = {"impl": label, "world_size": ranks, "batch": batch, **numbers, "setup_s": seconds,
                   "param_bytes": gather(memory["parameters"]), "cache_bytes": gather(memory["cache"]),
                   "peak_bytes": gather(numbers["peak_bytes"]), "tuned": gather(numbers["tuned"]),
                   "ranks_identical": all(torch.equal(t, generated) for t in gather(generated)),
                   "ar_ms_by_impl": extra["ar_ms"].get(batch) if not single else None}
            row["ar_ms"] = min(row["ar_ms_by_impl"].values()) if row["ar_ms_by_impl"] else None
            if args.profile:
                row["kernels"] = gather(decode_kernels(runner, ids, mask, args.gen_len))
            rows.append({**row, **derived(row, stats, args, ctx.dtype, extra["bandwidth"])})
    return rows, tokens


def _all_gather(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # drops compiled graphs and their CUDA graph pools
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_tokens(ctx: Context, args, prompts: dict) -> dict:
    """HF eager greedy tokens on rank 0's device (other ranks get {})."""
    reference = {}
    if ctx.rank == 0:
        runner = IMPLS["hf"][0](ctx)
        reference = {b: runner.generate(ids, mask, args.check_tokens).cpu() for b, (ids, mask) in prompts.items()}
        del runner
    free_memory(ctx.device)
    barrier(ctx.device)
    return reference


def matched(tokens: torch.Tensor, reference: torch.Tensor, start: int, count: int) -> int:
    """Leading generated tokens equal in every row."""
    same = (tokens[:, start:start + count] == reference[:, start:start + count]).all(0).tolist()
    return same.index(False) if False in same else len(same)


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


def kernel_table(rows: list) -> str:
    """--profile's numbers, rank by rank: kernels per decode step, their busy time against p50, the
    longest ones."""
    lines = []
    for r in rows:
        p50 = r["decode_ms"]["p50"]
        for rank, k in enumerate(r.get("kernels", [])):
            lines.append(f"{r['impl']} N={r['world_size']} batch {r['batch']} rank {rank}: {k['count']:.1f} kernels "
                         f"a decode step, busy {k['busy_ms']:.3f} of {p50:.3f} ms "
                         f"(between kernels {p50 - k['busy_ms']:.3f} ms)")
            lines += [f"    {ms * 1e3:8.1f} us  {count:6.2f}x  {name[:110]}" for name, count, ms in k["top"]]
    return "\n".join(lines)


def versions() -> dict:
    found = {}
    for package in ("torch", "transformers", "accelerate", "deepspeed"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def find_max_batch(name: str, ctx: Context, args) -> int | None:
    """Largest batch that generates without running out of memory: doubling from the largest --batch
    until one fails, then --max-batch-halvings bisections between the last that fit and the first that
    did not (to within 1/2**halvings of it). All ranks of a TP impl hold the same shapes, so they run out
    together; one that failed alone would leave the others waiting in a collective."""
    setup, single = IMPLS[name]
    if single and ctx.rank != 0:
        return None
    runner = setup(ctx)
    best, too_big, batch = None, None, max(args.batch)
    while batch <= MAX_BATCH_LIMIT:
        if generates(runner, batch, ctx, args, single):
            best, batch = batch, batch * 2
        else:
            too_big = batch
            break
    for _ in range(args.max_batch_halvings if best and too_big else 0):
        batch = (best + too_big) // 2
        if batch == best:
            break
        if generates(runner, batch, ctx, args, single):
            best = batch
        else:
            too_big = batch
    return best


def generates(runner: Runner, batch: int, ctx: Context, args, single: bool) -> bool:
    """Whether `runner` generates --gen-len tokens for `batch` prompts without running out of memory."""
    ids, mask = make_prompt(batch, args.prompt_len, ctx.config.vocab_size, args.seed, ctx.device)
    try:
        runner.generate(ids, mask, args.gen_len)
        fits = 1
    except torch.cuda.OutOfMemoryError:
        fits = 0
    del ids, mask
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    if not single:
        flag = torch.tensor(fits, device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        fits = int(flag)
    print(f"[inference_test] {args.find_max_batch} batch {batch}: {'fits' if fits else 'out of memory'}",
          file=sys.stderr, flush=True)
    return bool(fits)


def error_rows(name: str, labels: list[str], world_size: int, error: Exception) -> list[dict]:
    first_line = (str(error).splitlines() or [""])[0][:300]
    return [{"impl": label, "world_size": 1 if IMPLS[name][1] else world_size,
             "error": f"{type(error).__name__}: {first_line}"} for label in labels]


def add_matches(rows: list, tokens: dict, reference: dict, args) -> None:
    checked = min(args.check_tokens, args.gen_len)
    for row in rows:
        if "error" not in row:
            row.update(match=matched(tokens[row["impl"]][row["batch"]], reference[row["batch"]], args.prompt_len,
                                     checked), checked=checked)


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def impl_runs(impls: list, ctx: Context, variants: list, interleave: bool) -> list[tuple[str, list]]:
    """(impl, [(row label, context), ...]) of every run: fxtp-compile and fxtp-compile-n1 once per
    --compile-options variant, one after another, or each impl's variants in one run with --interleave."""
    runs = []
    for name in impls:
        for options in (variants if name in COMPILED and variants else [None]):
            label = f"{name} {json.dumps(options, separators=(',', ':'))}" if options else name
            runs.append((name, [(label, dataclasses.replace(ctx, compile_options=options))]))
    if not interleave:
        return runs
    grouped, seen = {}, collections.Counter()
    for name, labelled in runs:
        for label, run_ctx in labelled:  # one run keys its rows' tokens by label: a repeated variant is "(2)"
            seen[label] += 1
            grouped.setdefault(name, []).append((f"{label} ({seen[label]})" if seen[label] > 1 else label, run_ctx))
    return list(grouped.items())


def time_impls(ctx: Context, args, meta: dict) -> list:
    """Every impl of --impl over every batch size; rank 0 returns the rows (and writes them after each impl,
    so that a run cut short keeps what it measured)."""
    stats = ModelStats.of(ctx.config)
    prompts = {b: make_prompt(b, args.prompt_len, ctx.config.vocab_size, args.seed, ctx.device) for b in args.batch}
    multi = ctx.world_size > 1
    extra = {"bandwidth": hbm_bandwidth(ctx.device, args.hbm_bandwidth),
             "ar_ms": {b: allreduce_ms(b, stats, ctx.dtype, ctx.device) for b in args.batch} if multi else {}}
    impls = [name for name in args.impl if not (multi and IMPLS[name][1]) or args.single_too]
    reference = reference_tokens(ctx, args, prompts) if multi and not args.no_reference else {}
    meta.update(hbm_bandwidth=extra["bandwidth"], skipped=[name for name in args.impl if name not in impls],
                reference="hf eager, 1 device (rank 0)" if reference else None,
                check=f"token-exact greedy, first {min(args.check_tokens, args.gen_len)} generated tokens")
    rows = []
    for name, runs in impl_runs(impls, ctx, args.compile_options, args.interleave):
        labels = [label for label, _ in runs]
        if ctx.rank == 0:
            print(f"[inference_test] {' / '.join(labels)} ...", file=sys.stderr, flush=True)
        try:
            impl_rows, tokens = run_impl(name, runs, args, prompts, stats, extra) \
                if not IMPLS[name][1] or ctx.rank == 0 else ([], {})
        except Exception as error:  # reported in the table; the other impls still run
            impl_rows, tokens = error_rows(name, labels, ctx.world_size, error), {}
        free_memory(ctx.device)
        barrier(ctx.device)
        if ctx.rank != 0:
            continue
        if not reference and tokens and (not multi or args.no_reference):
            reference, meta["reference"] = tokens[labels[0]], labels[0]
        if reference:
            add_matches(impl_rows, tokens, reference, args)
        rows += impl_rows
        add_one_device_ratios(rows)
        write_json(args.out, {"meta": meta, "results": rows})
    return rows


def add_one_device_ratios(rows: list) -> None:
    """Each row of N > 1 gets "x_best_1gpu", its p50 over the fastest one-device row's at its batch
    size, and "best_1gpu", that row's impl; only where the run has one (--single-too)."""
    timed = [row for row in rows if "error" not in row]
    for row in timed:
        singles = [other for other in timed if other["world_size"] == 1 and other["batch"] == row["batch"]]
        if row["world_size"] > 1 and singles:
            best = min(singles, key=lambda other: other["decode_ms"]["p50"])
            row.update(x_best_1gpu=row["decode_ms"]["p50"] / best["decode_ms"]["p50"], best_1gpu=best["impl"])


def one_device_ratio_lines(rows: list) -> list[str]:
    return [f"{row['impl']} N={row['world_size']} batch {row['batch']}: {row['x_best_1gpu']:.3f}x of the fastest "
            f"1-GPU row ({row['best_1gpu']}, same run)" for row in rows if "x_best_1gpu" in row]


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
