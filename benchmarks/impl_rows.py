"""inference_test.py's timing: every impl of --impl over every batch size, a row each (the JSON's
"results" and the table), its tokens checked against a reference and, at N > 1, its p50 set against
the fastest one-device row."""
from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time

import torch

from decode_floor import ModelStats, allreduce_ms, derived, hbm_bandwidth  # benchmarks/, beside this script
from decode_impls import COMPILED, IMPLS, free_memory
from decode_timing import measure
from kernel_profile import decode_kernels
from peers import Context
from process_group import all_gather_objects, barrier
from random_model import make_prompt


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
    gather = (lambda value: [value]) if single else all_gather_objects
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
