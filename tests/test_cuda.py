"""Compiled decode on real GPUs (fxtp/decode/decode_graph.py): the CUDA-graph replay of a step with push
(by default with the fused residual add and RMSNorm and fxtp's decode attention), symmetric-memory
or NCCL all_reduce gives HF's greedy tokens (Llama under every option; main's default for the other
forms: biases, q/k norms, gelu, soft-capping, fused projections, experts), fxtp::push_all_reduce
sums exactly, fxtp::push_all_reduce_add_rms_norm adds and normalizes as torch does, and
fxtp/kernels/gemv_push.py's ops give the bits of the GEMV and then push, eagerly and in CUDA-graph replays.
Skipped on machines with fewer than 2 GPUs; run on a GPU machine with
`python -m pytest -q tests/test_cuda.py`."""
import pytest
import torch
import torch.distributed as dist

import fxtp
from fxtp.tiny_configs import tiny_model
from fxtp.runtime.rank_processes import run_ranks
from fxtp.kernels.dependent_launch import launching_with_pdl
from fxtp.kernels.push_all_reduce import add_rms_norm

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

NEW_TOKENS = 12


def prompts(vocab: int, batch: int):
    ids = torch.randint(3, vocab, (batch, 9), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, :4] = 0  # left padding
    return ids, mask


def compiled_generate_on_rank(rank, arch, batches, compile):
    """Rank body: the compiled generator's greedy tokens for each prompt batch, twice (the second
    request replays the captured graph), and the options it chose."""
    device = torch.device("cuda", rank)
    generator = fxtp.compile(tiny_model(arch), 2).generator(rank, device=device, compile=compile)
    tokens = [[generator.generate(ids.to(device), mask.to(device), max_new_tokens=NEW_TOKENS, eos_token_id=[]).cpu()
               for _ in range(2)] for ids, mask in batches]
    return tokens, generator.compile_options


@pytest.mark.parametrize("compile", [True, {"triton.enable_pdl": False}, {"fxtp.push_norm": False},
                                     {"fxtp.decode_attention": False}, {"fxtp.merge_projections": False},
                                     {"fxtp.store_gemv_inputs": False}, {"fxtp.gemv": 8 << 20}, {"fxtp.gemv": False},
                                     {"fxtp.gated_gemv": False},
                                     {"fxtp.rotary_gemv": False}, {"fxtp.gemv_push": True},
                                     {"fxtp.push_all_reduce": False}, {"_collective.auto_select": False}],
                         ids=["push", "push_without_pdl", "push_without_norm", "cudnn_attention", "unmerged", "unstored",
                              "prefetching_gemv", "inductor_gemv", "ungated", "unrotated", "pushing_gemv", "one_shot",
                              "nccl"])
def test_compiled_decode_on_two_gpus_generates_like_hf(compile):
    model = tiny_model("llama")
    batches = [prompts(model.config.vocab_size, batch) for batch in (1, 3)]  # batch 1: matmuls become reductions
    expected = [model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0) for ids, mask in batches]
    results = run_ranks(compiled_generate_on_rank, 2, "llama", batches, compile, timeout=900, backend="nccl")
    for tokens, options in results:
        assert options["coordinate_descent_tuning"] is True
        user = compile if isinstance(compile, dict) else {}
        assert options["triton.enable_pdl"] is user.get("triton.enable_pdl", True)
        assert options["_collective.auto_select"] is user.get("_collective.auto_select", True)
        assert options["fxtp.push_all_reduce"] is user.get("fxtp.push_all_reduce", options["_collective.auto_select"])
        assert options["fxtp.push_norm"] is user.get("fxtp.push_norm", options["fxtp.push_all_reduce"])
        assert options["fxtp.gemv_push"] is user.get("fxtp.gemv_push", False)
        assert options["fxtp.gemv_blocks"] == user.get("fxtp.gemv_blocks", {})
        assert options["fxtp.decode_attention"] is user.get("fxtp.decode_attention", True)
        assert options["fxtp.merge_projections"] is user.get("fxtp.merge_projections", True)
        assert options["fxtp.store_gemv_inputs"] is user.get("fxtp.store_gemv_inputs", True)
        assert options["fxtp.gemv"] == user.get("fxtp.gemv", True)  # a number of bytes, or a bool
        assert options["fxtp.gated_gemv"] is user.get("fxtp.gated_gemv", True)
        assert options["fxtp.rotary_gemv"] is user.get("fxtp.rotary_gemv", True)
        assert options["fxtp.gemv_preload"] is user.get("fxtp.gemv_preload", True)
        for (first, second), reference in zip(tokens, expected):
            assert torch.equal(first, reference) and torch.equal(second, reference)
    assert results[0][0][0][0].shape == (1, 9 + NEW_TOKENS)


# qwen2: biases; qwen3: q and k normed before the rotation; gemma: gelu, scaled embeddings, 1 + w norms;
# gemma2: soft-capped attention scores and logits, sliding-window layers; phi3: its own fused q|k|v and
# gate_up; mixtral: experts (sharded) behind a router (replicated), in float32 through
# fxtp/kernels/grouped_mm_by_rows.py, at batch 3 too (6 rows over 4 experts: its by-expert form)
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"])
def test_compiled_decode_on_two_gpus_generates_like_hf_beyond_llama(arch):
    """main's default at batch 1, where the decode step's fused kernels apply to what they match
    (Mixtral at batch 3 too)."""
    model = tiny_model(arch)
    batches = [prompts(model.config.vocab_size, batch) for batch in ((1, 3) if arch == "mixtral" else (1,))]
    expected = [model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0) for ids, mask in batches]
    for tokens, _ in run_ranks(compiled_generate_on_rank, 2, arch, batches, True, timeout=900, backend="nccl"):
        for (first, second), want in zip(tokens, expected):
            assert torch.equal(first, want) and torch.equal(second, want)


def push_rounds_on_rank(rank, cases, rounds, pdl):
    """Rank body: per (numel, dtype), this rank's parts and the sums push_all_reduce gave for them,
    first eagerly, then from replays of a CUDA graph of three calls; launched with PDL if `pdl`."""
    with launching_with_pdl(pdl):
        return push_rounds(rank, cases, rounds)


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


@pytest.mark.parametrize("pdl", [False, True])
def test_push_all_reduce_sums_exactly_eagerly_and_in_graph_replays(pdl):
    rounds = 6  # a multiple of the graph's three calls
    cases = [(4096, torch.bfloat16), (3 * 4096, torch.bfloat16), (1000, torch.float16), (4096, torch.float32),
             (64 * 4096, torch.bfloat16),  # MAX_BYTES: still pushed
             (65 * 4096, torch.bfloat16)]  # over it: NCCL
    ranks = run_ranks(push_rounds_on_rank, 2, cases, rounds, pdl, timeout=600, backend="nccl")
    for case, (parts0, sums0), (parts1, sums1) in zip(cases, *ranks):
        expected = [(a.float() + b.float()).to(a.dtype) for a, b in zip(parts0, parts1)]
        assert len(sums0) == 2 * rounds
        for got, want in zip(sums0, expected + expected):  # eagerly, then replayed
            assert torch.equal(got, want), case
        assert all(torch.equal(a, b) for a, b in zip(sums0, sums1)), case


EPS = 1e-5


def push_norm_rounds_on_rank(rank, cases, rounds):
    """Rank body: per (rows, hidden size, dtype), this rank's parts, the residuals and weight every
    rank shares, and the (hidden, normed) push_all_reduce_add_rms_norm gave for them, first eagerly,
    then from replays of a CUDA graph of three calls."""
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
    op's from replays of a CUDA graph of three calls."""
    device = torch.device("cuda", rank)
    group = dist.group.WORLD.group_name
    generator, shared = torch.Generator(device).manual_seed(rank), torch.Generator(device).manual_seed(100)
    results = []
    with launching_with_pdl(*pdl_launch):
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
    return results


def test_gemv_push_gives_the_gemv_then_push_eagerly_and_in_graph_replays(pdl_launch):
    """The GEMV that pushes its outputs and the push kernel that only sums: the same bits as fxtp's
    GEMV and then push all_reduce (with and without the norm epilogue), on both ranks."""
    rounds = 6  # a multiple of the graph's three calls
    cases = [(4096, 2048, torch.bfloat16, True), (4096, 7168, torch.bfloat16, True),  # Llama-3-8B's o, down at N=2
             (4096, 2048, torch.bfloat16, False), (1000, 300, torch.float16, False), (2048, 512, torch.float32, True),
             (300000, 16, torch.bfloat16, False)]  # over push's MAX_BYTES: the GEMV, then NCCL
    ranks = run_ranks(gemv_push_rounds_on_rank, 2, cases, rounds, pdl_launch, timeout=600, backend="nccl")
    for case, (eager0, replayed0), (eager1, replayed1) in zip(cases, *ranks):
        for eager, replayed in ((eager0, replayed0), (eager1, replayed1)):
            for (fused, unfused), again in zip(eager, replayed):
                assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(fused, unfused, again)), case
        assert all(torch.equal(a, b) for pair0, pair1 in zip(eager0, eager1) for a, b in zip(pair0[0], pair1[0])), case
