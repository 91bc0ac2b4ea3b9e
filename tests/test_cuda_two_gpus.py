"""Tests on two real GPUs (`needs_gpus(2)`, tests/test_cuda.py's); on a machine with fewer they skip.
Run on a GPU machine with `python -m pytest -q tests/test_cuda.py tests/test_cuda_two_gpus.py`.

The compiled decode step at N=2 (fxtp/decode/decode_graph.py) with push all_reduce (by default with
the fused residual add and RMSNorm), symmetric-memory or NCCL all_reduce gives HF's greedy tokens
(Llama under every option; the defaults for the other forms); fxtp::push_all_reduce sums exactly,
fxtp::push_all_reduce_add_rms_norm adds and normalizes as torch does, and fxtp/kernels/gemv_push.py's
ops give the bits of the GEMV and then push, eagerly and in CUDA-graph replays. Every kernel test
counts the kernels' launches (fxtp/kernels/launches.py), so a fallback (NCCL) cannot pass for them.
"""
import collections

import pytest
import torch
import torch.distributed as dist

from fxtp.decode.options import requested, resolve
from fxtp.kernels import push_all_reduce as pushed
from fxtp.kernels.dependent_launch import launching_with_pdl
from fxtp.kernels.launches import counting_launches
from fxtp.kernels.push_all_reduce import add_rms_norm
from fxtp.runtime.rank_processes import run_ranks
from fxtp.tiny_configs import tiny_model
from test_cuda import NEW_TOKENS, assert_generates, compiled_generate_on_rank, hf_tokens, needs_gpus, prompts


# The compiled decode step


@needs_gpus(2)
@pytest.mark.parametrize("compile", [True, {"pdl": False}, {"push_norm": False}, {"decode_attention": False},
                                     {"merge_projections": False}, {"store_gemv_inputs": False},
                                     {"gemv_prefetch_bytes": 8 << 20}, {"gemv": False}, {"gated_gemv": False},
                                     {"rotary_gemv": False}, {"gemv_push": True}, {"push_all_reduce": False},
                                     {"one_shot_all_reduce": False}],
                         ids=["push", "push_without_pdl", "push_without_norm", "cudnn_attention", "unmerged", "unstored",
                              "prefetching_gemv", "inductor_gemv", "ungated", "unrotated", "pushing_gemv", "one_shot",
                              "nccl"])
def test_compiled_decode_on_two_gpus_generates_like_hf(compile):
    model = tiny_model("llama")
    batches = [prompts(model.config.vocab_size, batch) for batch in (1, 3)]  # batch 1: matmuls become reductions
    results = run_ranks(compiled_generate_on_rank, 2, "llama", 2, batches, compile, timeout=900, backend="nccl")
    assert_generates(results, hf_tokens(model, batches))
    for _, options, launches in results:
        assert options == resolve(requested(compile), 2, symmetric_memory=True)  # NVLink: it works
        assert ("push_all_reduce" in launches) is options.push_all_reduce  # the embedding's all_reduce at least
        assert ("pushing_gemv" in launches) is options.gemv_push
    assert results[0][0][0][0].shape == (1, 9 + NEW_TOKENS)


# qwen2: biases; qwen3: q and k normed before the rotation; gemma: gelu, scaled embeddings, 1 + w norms;
# gemma2: soft-capped attention scores and logits, sliding-window layers; phi3: its own fused q|k|v and
# gate_up; mixtral: experts (sharded) behind a router (replicated), in float32 through
# fxtp/kernels/grouped_mm_by_rows.py, at batch 3 too (6 rows over 4 experts: its by-expert form)
@needs_gpus(2)
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"])
def test_compiled_decode_on_two_gpus_generates_like_hf_beyond_llama(arch):
    """The default options at batch 1, where the decode step's fused kernels apply to what they match
    (Mixtral at batch 3 too)."""
    model = tiny_model(arch)
    batches = [prompts(model.config.vocab_size, batch) for batch in ((1, 3) if arch == "mixtral" else (1,))]
    assert_generates(run_ranks(compiled_generate_on_rank, 2, arch, 2, batches, True, timeout=900, backend="nccl"),
                     hf_tokens(model, batches))


# Push all_reduce and the GEMV that pushes


def push_rounds_on_rank(rank, cases, rounds, pdl):
    """Rank body: per (numel, dtype), this rank's parts and the sums push_all_reduce gave for them,
    first eagerly, then from replays of a CUDA graph of three calls; launched with PDL if `pdl`; and
    the kernels launched."""
    with launching_with_pdl(pdl), counting_launches() as launches:
        return push_rounds(rank, cases, rounds), launches


def push_rounds(rank, cases, rounds):
    device = torch.device("cuda", rank)
    group = dist.group.WORLD.group_name
    generator = torch.Generator(device).manual_seed(rank)
    results = []
    for numel, dtype in cases:
        parts = [torch.randn(numel, device=device, generator=generator).to(dtype) for _ in range(rounds)]
        parts[1][:5] = -0.0
        sums = [torch.ops.fxtp.push_all_reduce(part, group) for part in parts]
        static = [part.clone() for part in parts[:3]]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = [torch.ops.fxtp.push_all_reduce(x, group) for x in static]
        for start in range(0, rounds, 3):
            for x, part in zip(static, parts[start:start + 3]):
                x.copy_(part)
            graph.replay()
            sums += [out.clone() for out in outputs]
        torch.cuda.synchronize(device)
        results.append(([p.cpu() for p in parts], [s.cpu() for s in sums]))
    return results


@needs_gpus(2)
@pytest.mark.parametrize("pdl", [False, True])
def test_push_all_reduce_sums_exactly_eagerly_and_in_graph_replays(pdl):
    rounds = 6  # a multiple of the graph's three calls
    cases = [(4096, torch.bfloat16), (3 * 4096, torch.bfloat16), (1000, torch.float16), (4096, torch.float32),
             (64 * 4096, torch.bfloat16),  # MAX_BYTES: still pushed
             (65 * 4096, torch.bfloat16)]  # over it: NCCL
    ranks = run_ranks(push_rounds_on_rank, 2, cases, rounds, pdl, timeout=600, backend="nccl")
    pushed_cases = len(cases) - 1  # eagerly, then once more as the graph captured three calls
    assert [launches for _, launches in ranks] == [{"push_all_reduce": pushed_cases * (rounds + 3)}] * 2
    ranks = [results for results, _ in ranks]
    for case, (parts0, sums0), (parts1, sums1) in zip(cases, *ranks):
        expected = [(a.float() + b.float()).to(a.dtype) for a, b in zip(parts0, parts1)]
        assert len(sums0) == 2 * rounds
        for got, want in zip(sums0, expected + expected):  # eagerly, then replayed
            assert torch.equal(got, want), case
        assert all(torch.equal(a, b) for a, b in zip(sums0, sums1)), case


EPS = 1e-5


def push_norm_rounds_on_rank(rank, cases, rounds):
    """Rank body: `push_norm_rounds`, and the kernels launched."""
    with counting_launches() as launches:
        return push_norm_rounds(rank, cases, rounds), launches


def push_norm_rounds(rank, cases, rounds):
    """Per (rows, hidden size, dtype), this rank's parts, the residuals and weight every rank shares,
    and the (hidden, normed) push_all_reduce_add_rms_norm gave for them, first eagerly, then from
    replays of a CUDA graph of three calls."""
    device = torch.device("cuda", rank)
    group = dist.group.WORLD.group_name
    generator, shared = torch.Generator(device).manual_seed(rank), torch.Generator(device).manual_seed(100)
    results = []
    for rows, size, dtype in cases:
        parts = [torch.randn(rows, 1, size, device=device, generator=generator).to(dtype) for _ in range(rounds)]
        parts[1][0, 0, :5] = -0.0
        residuals = [torch.randn(rows, 1, size, device=device, generator=shared).to(dtype) for _ in range(rounds)]
        weight = torch.randn(size, device=device, generator=shared).to(dtype)

        def fused(x, residual):
            return torch.ops.fxtp.push_all_reduce_add_rms_norm(x, residual, weight, EPS, dtype, group)

        outputs = [fused(x, residual) for x, residual in zip(parts, residuals)]
        static = [(x.clone(), residual.clone()) for x, residual in zip(parts[:3], residuals[:3])]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            captured = [fused(x, residual) for x, residual in static]
        for start in range(0, rounds, 3):
            for (x, residual), part, new_residual in zip(static, parts[start:start + 3], residuals[start:start + 3]):
                x.copy_(part)
                residual.copy_(new_residual)
            graph.replay()
            outputs += [(hidden.clone(), normed.clone()) for hidden, normed in captured]
        torch.cuda.synchronize(device)
        results.append(([p.cpu() for p in parts], [r.cpu() for r in residuals], weight.cpu(),
                        [(hidden.cpu(), normed.cpu()) for hidden, normed in outputs]))
    return results


@needs_gpus(2)
def test_push_all_reduce_add_rms_norm_adds_and_normalizes_eagerly_and_in_graph_replays():
    """hidden exactly as torch's sum and add; normed within two ulps of torch's on the CPU (the
    order of the mean's sum and the GPU's rsqrt differ), and the same bits on both ranks."""
    rounds = 6  # a multiple of the graph's three calls
    cases = [(1, 4096, torch.bfloat16), (3, 4096, torch.bfloat16), (5, 1000, torch.bfloat16), (1, 4096, torch.float32),
             (2, 8192, torch.bfloat16),  # MAX_ROW: still one program a row
             (1, 16384, torch.bfloat16),  # longer rows: plain push, then torch
             (80, 4096, torch.bfloat16)]  # over MAX_BYTES: NCCL, then torch
    tolerance = {torch.bfloat16: dict(rtol=2 * 2 ** -7, atol=1e-5), torch.float32: dict(rtol=1e-5, atol=1e-6)}
    ranks = run_ranks(push_norm_rounds_on_rank, 2, cases, rounds, timeout=600, backend="nccl")
    calls = rounds + 3  # eagerly, then once more as the graph captured three calls
    # the longer rows: plain push, then torch; over MAX_BYTES: NCCL, then torch
    assert [launches for _, launches in ranks] == [{"push_all_reduce_add_rms_norm": (len(cases) - 2) * calls,
                                                    "push_all_reduce": calls}] * 2
    ranks = [results for results, _ in ranks]
    for case, (parts0, residuals, weight, outputs0), (parts1, _, _, outputs1) in zip(cases, *ranks):
        dtype = case[2]
        expected = [add_rms_norm((a.float() + b.float()).to(dtype), residual, weight, EPS, dtype)
                    for a, b, residual in zip(parts0, parts1, residuals)]
        assert len(outputs0) == 2 * rounds
        for (hidden, normed), (want_hidden, want_normed) in zip(outputs0, expected + expected):  # eager, replayed
            assert torch.equal(hidden, want_hidden), case
            torch.testing.assert_close(normed, want_normed, **tolerance[dtype])
        assert all(torch.equal(a, b) for pair0, pair1 in zip(outputs0, outputs1) for a, b in zip(pair0, pair1)), case


def gemv_push_rounds_on_rank(rank, cases, rounds, pdl_launch):
    """Rank body: per (rows, columns, dtype, norm), the outputs of fxtp/kernels/gemv_push.py's op and of the
    GEMV then push (interleaved on the same buffers, as a decode step's calls are), eagerly, and the
    op's from replays of a CUDA graph of three calls; and the kernels launched."""
    device = torch.device("cuda", rank)
    group = dist.group.WORLD.group_name
    generator, shared = torch.Generator(device).manual_seed(rank), torch.Generator(device).manual_seed(100)
    results = []
    with launching_with_pdl(*pdl_launch), counting_launches() as launches:
        for rows, columns, dtype, norm in cases:
            xs = [torch.randn(1, 1, columns, device=device, generator=generator).to(dtype) for _ in range(rounds)]
            weight = (torch.randn(rows, columns, device=device, generator=generator) / columns ** 0.5).to(dtype)
            residuals = [torch.randn(1, 1, rows, device=device, generator=shared).to(dtype) for _ in range(rounds)]
            norm_weight = torch.randn(rows, device=device, generator=shared).to(dtype)

            def fused(x, residual):
                if norm:
                    return torch.ops.fxtp.gemv_push_all_reduce_add_rms_norm(x, weight, None, 0, residual, norm_weight,
                                                                            EPS, dtype, group)
                return (torch.ops.fxtp.gemv_push_all_reduce(x, weight, None, 0, group),)

            def unfused(x, residual):
                part = torch.ops.fxtp.gemv(x, weight, None, 0)
                if norm:
                    return torch.ops.fxtp.push_all_reduce_add_rms_norm(part, residual, norm_weight, EPS, dtype, group)
                return (torch.ops.fxtp.push_all_reduce(part, group),)

            eager = [(fused(x, residual), unfused(x, residual)) for x, residual in zip(xs, residuals)]
            static = [(x.clone(), residual.clone()) for x, residual in zip(xs[:3], residuals[:3])]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                captured = [fused(x, residual) for x, residual in static]
            replayed = []
            for start in range(0, rounds, 3):
                for (x, residual), new_x, new_residual in zip(static, xs[start:start + 3], residuals[start:start + 3]):
                    x.copy_(new_x)
                    residual.copy_(new_residual)
                graph.replay()
                replayed += [[out.clone() for out in outputs] for outputs in captured]
            torch.cuda.synchronize(device)
            results.append(([[[t.cpu() for t in outputs] for outputs in pair] for pair in eager],
                            [[t.cpu() for t in outputs] for outputs in replayed]))
    return results, launches


@needs_gpus(2)
def test_gemv_push_gives_the_gemv_then_push_eagerly_and_in_graph_replays(pdl_launch):
    """The GEMV that pushes its outputs and the push kernel that only sums: the same bits as fxtp's
    GEMV and then push all_reduce (with and without the norm epilogue), on both ranks."""
    rounds = 6  # a multiple of the graph's three calls
    cases = [(4096, 2048, torch.bfloat16, True), (4096, 7168, torch.bfloat16, True),  # Llama-3-8B's o, down at N=2
             (4096, 2048, torch.bfloat16, False), (1000, 300, torch.float16, False), (2048, 512, torch.float32, True),
             (300000, 16, torch.bfloat16, False)]  # over push's MAX_BYTES: the GEMV, then NCCL
    ranks = run_ranks(gemv_push_rounds_on_rank, 2, cases, rounds, pdl_launch, timeout=600, backend="nccl")
    expected = collections.Counter()  # per case: the op eagerly and captured (3 calls), the GEMV then push eagerly
    for rows, _, dtype, norm in cases:
        if pushed.takes(dtype, rows):
            push = "push_all_reduce_add_rms_norm" if norm else "push_all_reduce"
            expected.update({"pushing_gemv": rounds + 3, "gemv": rounds, push: 2 * rounds + 3})
        else:  # both the GEMV, then NCCL
            expected.update({"gemv": 2 * rounds + 3})
    assert [launches for _, launches in ranks] == [expected] * 2
    ranks = [results for results, _ in ranks]
    for case, (eager0, replayed0), (eager1, replayed1) in zip(cases, *ranks):
        for eager, replayed in ((eager0, replayed0), (eager1, replayed1)):
            for (fused, unfused), again in zip(eager, replayed):
                assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(fused, unfused, again)), case
        assert all(torch.equal(a, b) for pair0, pair1 in zip(eager0, eager1) for a, b in zip(pair0[0], pair1[0])), case
