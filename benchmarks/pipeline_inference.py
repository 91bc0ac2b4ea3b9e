"""The DeepSpeed AutoTP tutorial's benchmark (DeepSpeedExamples inference/huggingface/text-generation/
inference-test.py) as a user of it runs it, with `fxtp.parallelize` where it calls
`deepspeed.init_inference`: a `transformers.pipeline("text-generation", ...)` is built as usual, its
model is replaced by the sharded one, and the pipeline call that is timed is the seed's.

    torchrun --nproc_per_node 2 benchmarks/pipeline_inference.py --name tiny:llama --device cpu \\
        --batch_size 2 --max_new_tokens 8 --greedy --trials 2
    python benchmarks/pipeline_inference.py --name tiny:llama --device cpu --world_size 2   # ranks in lockstep
    torchrun --nproc_per_node 2 benchmarks/pipeline_inference.py --name shape:llama3-8b --dtype bfloat16 \\
        --device cuda --compile --max_new_tokens 128 --out n2.json

--name: a HF model directory; `tiny:<arch>`, a tiny random model and tokenizer saved to a temporary
directory (fxtp.tiny_tokenizer.save_tiny_pretrained; every rank saves its own from the same seed, and
the ranks' weight digests are compared); or `shape:<name>`, a real shape of fxtp.tiny_configs.REAL_SHAPES
with random weights (seeded, built on the device) and a local 256-token tokenizer, generating only
ids the tokenizer has (the others' logits are masked, as a tokenizer cannot decode them).
--impl hf is the seed's --hf_baseline (one process); --impl deepspeed is the seed itself, with
the CPU workarounds of shared/reference/peers.md (it needs the deepspeed package).
--plan stands in for the seed's injection policy: "auto", or a JSON file of {module pattern:
colwise | rowwise | replicate}.

Timing: a streamer passed to the pipeline call (the text-generation pipeline hands it to generate, which
calls put() with the prompt, put() once per step with the step's tokens, already on the host, then
end()) stamps each put. The first interval is the prefill with the first token ("first token"); the
others are one decode step each, pooled over the trials for the per-token block (the seed divides a
whole call by the token count instead, prefill included). --warmup calls run first, untimed; the
seed drops its first 3 samples instead. Percentiles are the seed's: the sorted samples' entry at
floor((count - 1) * q). Avg BW = bytes of weights one rank holds / avg per-token time; Avg flops =
2 * parameters one rank holds * batch / avg per-token time (the seed estimated both from
12 * layers * hidden^2). For fxtp the bytes are what its generator holds for a rank (non-persistent
buffers such as rotary inv_freq included) and the parameters those bytes over the dtype's size.

On CPU give each process one thread (torchrun sets OMP_NUM_THREADS=1 already; in one process set it):
with more threads than free cores a tiny model's step swings from 3 to 400 ms.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from importlib import metadata
from typing import Optional

import torch
import torch.distributed as dist
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList, pipeline)

import fxtp
from fxtp.tiny_configs import REAL_SHAPES, real_config
from fxtp.tiny_tokenizer import save_tiny_pretrained, tiny_tokenizer

# the seed's first prompts, repeated for larger batches as the seed does
PROMPTS = ("DeepSpeed is a machine learning framework", "He is working on", "He has a", "He got all",
           "Everyone is happy and I can", "The new movie that got Oscar this year",
           "In the far far distance from our galaxy,", "Peace is the only way")
PERCENTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--name", required=True, help="HF model directory, tiny:<arch> or shape:<REAL_SHAPES name>")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling, as the seed)")
    parser.add_argument("--use_meta_tensor", action="store_true",
                        help="build the model on meta and read each rank's slices from the directory")
    parser.add_argument("--plan", default="auto", help="auto, or a JSON file {module pattern: colwise|rowwise|replicate}")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="untimed pipeline calls before the trials")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--impl", default="fxtp", choices=["fxtp", "hf", "deepspeed"])
    parser.add_argument("--compile", action="store_true", help="fxtp's compiled CUDA-graph decode step")
    parser.add_argument("--world_size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="ranks; in one process fxtp runs them in lockstep (default: WORLD_SIZE, or 1)")
    parser.add_argument("--out", help="write the results as JSON here (rank 0)")
    args = parser.parse_args(argv)
    check_args(args, parser)
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse combinations that cannot run, before anything is built."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size < 1 or args.trials < 1 or args.warmup < 0:
        parser.error("--batch_size and --trials must be >= 1, --warmup >= 0")
    if args.max_new_tokens < 2:
        parser.error("--max_new_tokens must be >= 2: the per-token latency is that of the decode steps after the first token")
    if args.impl != "fxtp" and (args.compile or args.plan != "auto"):
        parser.error(f"--compile and --plan are fxtp's; --impl {args.impl} takes neither")
    if args.impl == "hf" and args.world_size > 1:
        parser.error("--impl hf runs one unsharded model: use --world_size 1 and launch one process")
    if args.impl == "deepspeed" and args.world_size != processes:
        parser.error("--impl deepspeed runs one rank per process: launch --world_size ranks with torchrun")
    if args.compile and (args.device != "cuda" or processes != args.world_size):
        parser.error("--compile captures a CUDA graph of one rank: use --device cuda and one process per rank (torchrun)")
    if args.use_meta_tensor and (args.name.startswith("shape:") or args.impl != "fxtp"):
        parser.error("--use_meta_tensor loads from a checkpoint directory with fxtp: give --name a directory or "
                     "tiny:<arch>, and --impl fxtp")
    if args.name.startswith("shape:") and args.name[len("shape:"):] not in REAL_SHAPES:
        parser.error(f"unknown shape {args.name!r}; known: {', '.join('shape:' + name for name in REAL_SHAPES)}")


def read_plan(plan: str):
    """"auto", or the JSON file's {module pattern: style} (fxtp checks the patterns and styles)."""
    if plan == "auto":
        return plan
    with open(plan) as file:
        styles = json.load(file)
    if not isinstance(styles, dict) or not styles:
        raise SystemExit(f"--plan {plan}: expected a JSON object of module pattern -> colwise | rowwise | replicate, "
                         f"got {styles!r}")
    return styles


def import_deepspeed(device: str):
    """deepspeed, patched for CPU as shared/reference/peers.md describes; exits naming the package if
    it is missing."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import deepspeed.comm.torch as deepspeed_torch
    except ImportError as error:
        raise SystemExit(f"--impl deepspeed needs the deepspeed package, which is not importable here ({error}). "
                         "Install it (pip install deepspeed; it builds from an sdist), or use --impl fxtp or --impl hf.")
    if device == "cpu":  # its shared-memory all-reduce needs a compiler toolchain: plain all_reduce instead
        deepspeed_torch.build_shm_op = lambda *args, **kwargs: None

        def inference_all_reduce(self, tensor, op=None, group=None):  # inference all-reduces are sums
            dist.all_reduce(tensor, group=group)
            return tensor
        deepspeed_torch.TorchBackend.inference_all_reduce = inference_all_reduce
    return deepspeed


class VocabLimit(LogitsProcessor):
    """Masks the ids from `size` on: a random-weight real shape has a larger vocab than the tiny
    tokenizer, which could not decode them."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.size:] = -math.inf
        return scores


class TokenClock:
    """A generate() streamer that stamps the time of each put(): the prompt's, then each step's."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def intervals(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.stamps, self.stamps[1:])]


def launch_facts(args: argparse.Namespace) -> tuple[int, torch.device]:
    """(this process's rank, its device)."""
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        return rank, torch.device("cuda", local_rank)
    return rank, torch.device("cpu")


def weights_digest(directory: str) -> str:
    """A digest of the directory's safetensors files: under torchrun every rank saves its own tiny
    model, and a rank with other weights would still agree on the text (the logits are all-reduced)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as file:
                digest.update(file.read())
    return digest.hexdigest()[:16]


def random_real_shape(name: str, dtype: torch.dtype, device: torch.device):
    """(the REAL_SHAPES model with seeded random weights built on `device`, a local tiny tokenizer)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)  # every rank builds the same weights
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(real_config(name), dtype=dtype).eval()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model, tokenizer


def build_pipeline(args: argparse.Namespace, directory: Optional[str], dtype: torch.dtype, device: torch.device):
    """The seed's pipeline, its model replaced by the impl's."""
    pipe_device = device.index if device.type == "cuda" else "cpu"
    world_size = args.world_size
    if args.use_meta_tensor:  # the seed's meta path: a weightless model, each rank's slices read from the directory
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dtype).eval()
        if os.path.exists(os.path.join(directory, "generation_config.json")):  # from_config leaves it at defaults
            model.generation_config = GenerationConfig.from_pretrained(directory)
        model = fxtp.parallelize(model, world_size, checkpoint=directory, device=device, compile=args.compile,
                                 plan=read_plan(args.plan))
        return pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(directory),
                        device=pipe_device)
    if directory is not None:
        pipe = pipeline("text-generation", model=directory, device=pipe_device, dtype=dtype)
    else:
        model, tokenizer = random_real_shape(args.name[len("shape:"):], dtype, device)
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device=pipe_device)
    if args.impl == "fxtp":
        pipe.model = fxtp.parallelize(pipe.model, world_size, device=device, compile=args.compile,
                                      plan=read_plan(args.plan))
    elif args.impl == "deepspeed":
        deepspeed = import_deepspeed(args.device)
        deepspeed.init_distributed("gloo" if args.device == "cpu" else "nccl")
        pipe.model = deepspeed.init_inference(pipe.model, tensor_parallel={"tp_size": world_size}, dtype=dtype,
                                              replace_with_kernel_inject=False)
    return pipe


def held_weights(pipe, impl: str) -> tuple[int, int]:
    """(bytes, parameters) of weights one rank holds (see the module's docstring)."""
    if impl == "fxtp":
        held = pipe.model.fxtp_runtime.generator.memory()["parameters"]
        return held, held // pipe.model.dtype.itemsize
    parameters = list(getattr(pipe.model, "module", pipe.model).parameters())  # deepspeed's engine wraps it
    return sum(p.nbytes for p in parameters), sum(p.numel() for p in parameters)


def latency_stats(samples: list[float]) -> dict[str, float]:
    """Avg and the seed's percentiles of `samples` (seconds), in ms."""
    ordered = sorted(samples)
    stats = {"avg": sum(ordered) / len(ordered) * 1e3}
    for key, q in PERCENTILES.items():
        stats[key] = ordered[math.floor((len(ordered) - 1) * q)] * 1e3
    return stats


def figure(value: float) -> str:
    """The seed's 8.2f, or 8.2e for a value it would print as 0.00 (a tiny model's flops)."""
    return f"{value:8.2f}" if value >= 0.01 or value == 0 else f"{value:8.2e}"


def latency_block(title: str, per_token: dict, first_token: dict, bandwidth: float, tflops: float) -> str:
    lines = [f"====== per token latency {title} ======", f"\tAvg Latency: {per_token['avg']:8.2f} ms"]
    lines += [f"\t{key.upper()} Latency: {per_token[key]:8.2f} ms" for key in PERCENTILES]
    lines += [f"\tAvg BW: {figure(bandwidth)} GB/s", f"\tAvg flops: {figure(tflops)} TFlops/s",
              f"\tFirst token (prefill) Avg: {first_token['avg']:8.2f} ms, P50: {first_token['p50']:8.2f} ms"]
    return "\n".join(lines)


def everyone(value, processes: int) -> list:
    """`value` from every process (rank order), or [value] in one process."""
    if processes == 1 or not dist.is_initialized():
        return [value]
    gathered = [None] * processes
    dist.all_gather_object(gathered, value)
    return gathered


def timed_calls(pipe, inputs: list[str], args: argparse.Namespace, device: torch.device, count: int, extra: dict):
    """`count` timed pipeline calls: (their wall times, their streamer intervals, the last outputs)."""
    walls, intervals, outputs = [], [], None
    for _ in range(count):
        clock = TokenClock()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        outputs = pipe(inputs, do_sample=not args.greedy, max_new_tokens=args.max_new_tokens,
                       batch_size=len(inputs), streamer=clock, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - start)
        intervals.append(clock.intervals())
    return walls, intervals, outputs


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.impl == "deepspeed":
        import_deepspeed(args.device)  # fail before building anything
    transformers.utils.logging.disable_progress_bar()
    rank, device = launch_facts(args)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="pipeline_inference_") as scratch:
        directory, digest = None, None
        if args.name.startswith("tiny:"):
            directory = save_tiny_pretrained(args.name[len("tiny:"):], scratch)
            digest = weights_digest(directory)
        elif not args.name.startswith("shape:"):
            directory = args.name
        started = time.perf_counter()
        pipe = build_pipeline(args, directory, dtype, device)
        setup_s = time.perf_counter() - started
        digests = everyone(digest, processes)
        if len(set(digests)) > 1:
            raise SystemExit(f"the ranks built different weights for {args.name} (digests {digests}): "
                             "tiny models must be built from the same seed on every rank")
        tokenizer_size = len(pipe.tokenizer)
        extra = {"logits_processor": LogitsProcessorList([VocabLimit(tokenizer_size)])} \
            if pipe.model.config.vocab_size > tokenizer_size else {}
        inputs = list((PROMPTS * math.ceil(args.batch_size / len(PROMPTS)))[:args.batch_size])
        warmup_s, _, _ = timed_calls(pipe, inputs, args, device, args.warmup, extra)
        walls, intervals, outputs = timed_calls(pipe, inputs, args, device, args.trials, extra)
        weight_bytes, parameters = held_weights(pipe, args.impl)
    texts = [[candidate["generated_text"] for candidate in row] for row in outputs]
    texts_by_rank = everyone(texts, processes)
    if rank != 0:
        return {}
    decode_steps = [step for trial in intervals for step in trial[1:]]
    if not decode_steps:
        raise SystemExit(f"no decode step was timed: every trial stopped at its first token {texts} (an end-of-sequence "
                         "token); use --greedy, another model or more --trials")
    per_token = latency_stats(decode_steps)
    first_token = latency_stats([trial[0] for trial in intervals])
    bandwidth = weight_bytes / (per_token["avg"] / 1e3) / 1e9
    tflops = 2 * parameters * args.batch_size / (per_token["avg"] / 1e3) / 1e12
    for prompt, row in zip(inputs, texts):
        print(f"\nin={prompt}\nout={row[0]}\n{'-' * 60}")
    title = f"({args.impl}, {args.world_size} rank{'s' * (args.world_size > 1)}, batch {args.batch_size}, {args.dtype})"
    print(latency_block(title, per_token, first_token, bandwidth, tflops), flush=True)
    result = {
        "impl": args.impl, "name": args.name, "world_size": args.world_size, "processes": processes,
        "device": str(device), "dtype": args.dtype, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "greedy": args.greedy, "compile": args.compile,
        "use_meta_tensor": args.use_meta_tensor, "plan": args.plan, "trials": args.trials, "warmup": args.warmup,
        "per_token_ms": per_token, "first_token_ms": first_token,
        "decode_steps_timed": sum(len(trial) - 1 for trial in intervals),
        "tokens_per_trial": [len(trial) for trial in intervals],
        "weight_bytes_per_rank": weight_bytes, "parameters_per_rank": parameters,
        "avg_bw_gb_s": bandwidth, "avg_tflops": tflops,
        "trial_s": walls, "warmup_s": warmup_s, "setup_s": setup_s,
        "texts_by_rank": texts_by_rank, "texts_agree": all(texts == other for other in texts_by_rank),
        "weights_digest_by_rank": digests,
        "versions": {package: metadata.version(package) for package in ("torch", "transformers")},
    }
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(0)
