"""inference_test.py --find-max-batch: the largest batch an impl generates without running out of
memory, instead of timing."""
from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist

from decode_impls import IMPLS  # benchmarks/, beside this script
from peers import Context, Runner
from random_model import make_prompt

MAX_BATCH_LIMIT = 4096


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
