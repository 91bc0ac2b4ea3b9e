"""Time a token of HF's `model.generate` driving an fxtp model, against fxtp's own generator, side by side.

    python benchmarks/hf_generate_speed.py --shape llama3-8b --dtype bfloat16 --compile --out hf_speed.json
    python benchmarks/hf_generate_speed.py --shape tiny:llama --device cpu --dtype float32   # CPU smoke run

Both loops run the same Generator (the same rank graphs, KV cache and, with --compile, the same
compiled CUDA-graph decode step), so the difference is the loop around the step: HF's
(prepare_inputs_for_generation, logits processors, stopping criteria, the growing input_ids and mask)
against fxtp's (fxtp/runtime/generation.py). A token's time is (generate of 1 + N new tokens -
generate of 1 new token) / N: the prefill and the first token cancel out. Greedy, and sampling with
top_p=0.9, each the median of --trials; every row stops only at max_new_tokens (no eos).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.tiny_configs import real_config, tiny_model


def build(shape: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    if shape.startswith("tiny:"):
        return tiny_model(shape.split(":", 1)[1], noise=0.05).to(device, dtype)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(real_config(shape), dtype=dtype).eval()
    return model


def seconds(run) -> float:
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    run()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - start


def per_token_ms(generate, new_tokens: int, trials: int) -> float:
    """Median over trials of (generate(1 + new_tokens) - generate(1)) / new_tokens, in ms."""
    times = [(seconds(lambda: generate(1 + new_tokens)) - seconds(lambda: generate(1))) / new_tokens
             for _ in range(trials)]
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", help="a real shape (fxtp.tiny_configs.REAL_SHAPES) or tiny:<arch>")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="fxtp's compiled CUDA-graph decode step")
    parser.add_argument("--compile-options", type=json.loads, default=None, metavar="JSON",
                        help='with --compile: DecodeOptions fields as a JSON dict, e.g. \'{"gemv": true}\'')
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.compile_options is not None and not args.compile:
        parser.error("--compile-options are the compiled step's: add --compile")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build(args.shape, dtype, device)
    model.generation_config.eos_token_id = None  # every row runs to max_new_tokens
    started = time.perf_counter()
    sharded = fxtp.parallelize(model, 1, device=device, compile=args.compile_options or args.compile)
    setup = time.perf_counter() - started
    generator = sharded.fxtp_runtime.generator
    ids = torch.randint(3, min(model.config.vocab_size, 32000), (args.batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    rows, first_calls = {}, {}  # first_calls: the first generate of each loop, which compiles and captures
    for name, options in (("greedy", dict(do_sample=False)), ("top-p 0.9", dict(do_sample=True, top_p=0.9))):
        loops = {
            "fxtp generator": lambda n, o=options: generator.generate(ids, mask, max_new_tokens=n, eos_token_id=[], **o),
            "HF generate": lambda n, o=options: sharded.generate(ids, attention_mask=mask, max_new_tokens=n,
                                                                 min_new_tokens=n, pad_token_id=0, **o),
        }
        for loop, run in loops.items():  # compile and capture outside the timing
            first_calls[f"{name}, {loop}"] = seconds(lambda: run(1 + args.new_tokens))
        row = {loop: per_token_ms(run, args.new_tokens, args.trials) for loop, run in loops.items()}
        row["ratio"] = row["HF generate"] / row["fxtp generator"]
        rows[name] = row
        print(f"{name:10s} fxtp generator {row['fxtp generator']:.3f} ms/token, HF generate through fxtp "
              f"{row['HF generate']:.3f} ms/token, ratio {row['ratio']:.3f}", flush=True)
    result = dict(shape=args.shape, dtype=args.dtype, batch=args.batch, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, compile=args.compile_options or args.compile, setup_s=setup, rows=rows,
                  first_generate_s=first_calls, compile_times=torch._dynamo.utils.compile_times(repr="str"),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, transformers=__import__("transformers").__version__)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
