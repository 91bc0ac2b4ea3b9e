"""Tests on one real GPU; on a machine without one they skip (`needs_gpus`, which
tests/test_cuda_two_gpus.py's tests, for two, use too). Run on a GPU machine with
`python -m pytest -q tests/test_cuda.py tests/test_cuda_two_gpus.py`.

fxtp's kernels against their references (the GEMV in its plain, gated and rotary forms;
decode attention), launched with and without PDL, eagerly and in CUDA-graph replays with new
inputs; and the compiled decode step at N=1 (fxtp/decode/decode_graph.py: inductor, then a CUDA
graph replayed every token), which gives HF's greedy tokens for Llama under several options and
for other forms (biases, q/k norms, gelu, fused projections, experts). Every kernel test counts the
kernel's launches (fxtp/kernels/launches.py), so a fallback cannot pass for it.
"""
import pytest
import torch

import fxtp
from fxtp.decode.options import requested, resolve
from fxtp.kernels.dependent_launch import launching_with_pdl
from fxtp.kernels.launches import counting_launches
from fxtp.kernels.rotary_gemv import unfused_rotary
from fxtp.tiny_configs import tiny_model
from test_decode_attention import assert_within_rounding, inputs, on, sdpa_over_repeated_heads
from test_gemv import gated_reference, reference
from test_gemv import operands as gemv_operands
from test_rotary_gemv import cloned
from test_rotary_gemv import operands as rotary_operands

NEW_TOKENS = 12


def needs_gpus(count: int):
    """Marks a test that needs `count` CUDA GPUs: it skips on a machine with fewer."""
    have = torch.cuda.device_count()
    return pytest.mark.skipif(have < count, reason=f"needs {count} CUDA GPU{'s' * (count > 1)}, this machine has {have}")


# fxtp's kernels


@needs_gpus(1)
def test_gemv_eagerly_and_in_graph_replays(pdl_launch):
    """Back-to-back GEMVs (with PDL: each prefetching while the one before runs) give F.linear's
    values eagerly and from a captured graph replayed with new inputs."""
    shapes = [(3072, 4096), (4096, 2048), (50, 4096), (4096, 7168)]
    cases = [gemv_operands(rows, columns, torch.float32, rows == 50, seed=i) for i, (rows, columns) in enumerate(shapes)]
    with launching_with_pdl(*pdl_launch), counting_launches() as launches:
        eager = [torch.ops.fxtp.gemv(*case) for case in cases]
        static = [case[0].clone() for case in cases]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = [torch.ops.fxtp.gemv(x, weight, b) for x, (_, weight, b) in zip(static, cases)]
    assert launches == {"gemv": 2 * len(cases)}  # eagerly, then once more as the graph captured them
    for x in static:
        x.mul_(-0.5)
    graph.replay()
    torch.cuda.synchronize()
    for (x, weight, b), first, second in zip(cases, eager, replayed):
        torch.testing.assert_close(first.double(), reference(x, weight, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second.double(), reference(-0.5 * x, weight, b), rtol=1e-5, atol=1e-5)


@needs_gpus(1)
def test_gated_gemv_in_graph_replays(pdl_launch):
    """Gated GEMVs at Llama-3-8B's gate|up shape (N=2) and a ragged one, in a replayed CUDA graph."""
    cases = [gemv_operands(rows, columns, torch.float32, bias, seed=i)
             for i, (rows, columns, bias) in enumerate([(14336, 4096, False), (74, 1030, True)])]
    with launching_with_pdl(*pdl_launch), counting_launches() as launches:
        static = [case[0].clone() for case in cases]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = [torch.ops.fxtp.gemv(x, weight, b, prefetch_bytes=0, activation="silu")
                        for x, (_, weight, b) in zip(static, cases)]
    assert launches == {"gated_gemv": len(cases)}
    for x in static:
        x.mul_(-0.5)
    graph.replay()
    torch.cuda.synchronize()
    for (x, weight, b), out in zip(cases, replayed):
        torch.testing.assert_close(out, gated_reference(-0.5 * x, weight, b, "silu"), rtol=1e-5, atol=1e-5)


@needs_gpus(1)
def test_rotary_gemv_in_graph_replays(pdl_launch):
    """At Llama-3-8B's N=2 shape (16 heads, 4 kv heads of 128, hidden 4096) in a replayed CUDA graph
    whose position and input change between replays."""
    case = rotary_operands(16, 4, 128, 4096, torch.float32, False, length=64, position=5)
    unfused = cloned(case)
    with launching_with_pdl(*pdl_launch), counting_launches() as launches:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            q = torch.ops.fxtp.rotary_gemv(*case, 16)
    assert launches == {"rotary_gemv": 1}
    case[0].mul_(-0.5)
    case[5].fill_(40)
    graph.replay()
    torch.cuda.synchronize()
    unfused[0].mul_(-0.5)
    unfused[5].fill_(40)
    expected = unfused_rotary(*unfused, 16)
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(case[6][:, :, 40], unfused[6][:, :, 40], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(case[7][:, :, 40], unfused[7][:, :, 40], rtol=1e-5, atol=1e-5)


@needs_gpus(1)
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [256, 1100])
def test_decode_attention_eagerly_and_in_graph_replays(pdl, dtype, length):
    """Against SDPA: eagerly, then from a CUDA graph replayed with new inputs, twice (the counters
    set back to 0 inside the graph serve the next replay)."""
    cases = [inputs(2, 8, 2, 2, length, 128, "bool", dtype=dtype, seed=seed) for seed in range(3)]

    def check(got, *args):
        if dtype == torch.float32:
            torch.testing.assert_close(got, sdpa_over_repeated_heads(*args), atol=1e-5, rtol=0)
        else:
            assert_within_rounding(got, *args)

    static = on(torch.device("cuda"), *cases[0])
    with launching_with_pdl(pdl), counting_launches() as launches:
        check(torch.ops.fxtp.decode_attention(*static).cpu(), *cases[0])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.ops.fxtp.decode_attention(*static)
    assert launches == {"decode_attention": 2}
    for case in cases[1:]:
        for buffer, value in zip(static, case):
            buffer.copy_(value)
        graph.replay()
        check(out.cpu(), *case)


# The compiled decode step


def prompts(vocab: int, batch: int):
    ids = torch.randint(3, vocab, (batch, 9), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, :4] = 0  # left padding
    return ids, mask


def hf_tokens(model, batches: list) -> list:
    return [model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0) for ids, mask in batches]


def compiled_generate_on_rank(rank, arch, world_size, batches, compile, model=None):
    """Rank body: the compiled generator's greedy tokens for each prompt batch, twice (the second
    request replays the captured graph), the options it chose and fxtp's kernels it launched."""
    device = torch.device("cuda", rank)
    with counting_launches() as launches:
        model = tiny_model(arch) if model is None else model
        generator = fxtp.compile(model, world_size).generator(rank, device=device, compile=compile)
        tokens = [[generator.generate(ids.to(device), mask.to(device), max_new_tokens=NEW_TOKENS, eos_token_id=[]).cpu()
                   for _ in range(2)] for ids, mask in batches]
    return tokens, generator.compile_options, launches


def assert_generates(results: list, expected: list) -> None:
    for tokens, _, _ in results:
        for (first, second), reference_tokens in zip(tokens, expected):
            assert torch.equal(first, reference_tokens) and torch.equal(second, reference_tokens)


# llama: every kernel fxtp has for one GPU, and inductor's tuned reductions in place of fxtp's GEMV
@needs_gpus(1)
@pytest.mark.parametrize("compile", [True, {"pdl": False}, {"gemv": False, "coordinate_descent_tuning": True},
                                     {"gemv_prefetch_bytes": 8 << 20},
                                     {"decode_attention": False}, {"merge_projections": False},
                                     {"store_gemv_inputs": False}, {"gated_gemv": False, "rotary_gemv": False},
                                     {"compile_prefill": False}],
                         ids=["default", "without_pdl", "inductor_gemv", "prefetching_gemv", "cudnn_attention",
                              "unmerged", "unstored", "unfused_gemvs", "eager_prefill"])
def test_compiled_decode_on_one_gpu_generates_like_hf(compile):
    model = tiny_model("llama")
    batches = [prompts(model.config.vocab_size, batch) for batch in (1, 3)]  # batch 1: matmuls become reductions
    results = [compiled_generate_on_rank(0, "llama", 1, batches, compile)]
    assert_generates(results, hf_tokens(model, batches))
    _, options, launches = results[0]
    assert options == resolve(requested(compile), 1, symmetric_memory=False)
    merged = options.merge_projections  # the rotary and gated GEMVs fuse merged projections
    kernels = {"decode_attention": options.decode_attention, "rotary_gemv": options.rotary_gemv and merged,
               "gated_gemv": options.gated_gemv and merged, "gemv": options.gemv}
    assert set(launches) == {name for name, on in kernels.items() if on}
    assert results[0][0][0][0].shape == (1, 9 + NEW_TOKENS)


# qwen2: biases; qwen3: q and k normed before the rotation; gemma: gelu, scaled embeddings, 1 + w norms;
# phi3: its own fused q|k|v and gate_up; mixtral: experts behind a router, in float32 through
# fxtp/kernels/grouped_mm_by_rows.py: by row at batch 1 (2 rows over 4 experts), by expert at batch 3 (6 rows)
@needs_gpus(1)
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma", "phi3", "mixtral"])
def test_compiled_decode_on_one_gpu_generates_like_hf_beyond_llama(arch):
    model = tiny_model(arch)
    batches = [prompts(model.config.vocab_size, batch) for batch in ((1, 3) if arch == "mixtral" else (1,))]
    results = [compiled_generate_on_rank(0, arch, 1, batches, True)]
    assert_generates(results, hf_tokens(model, batches))
    assert "decode_attention" in results[0][2]


# 6 layers: the prefill and the decode step compile by layer regions (fxtp/decode/layer_regions.py), the
# prologue, a layer and the head (the final norm and the LM head) once each, and are called for every
# layer; after the first size (captured at its size), the prefill's regions serve every cache size:
# batch 3 of 768 tokens compiles only its decode step after batch 2 of 512
@needs_gpus(1)
def test_the_step_compiled_by_layer_regions_generates_like_hf():
    model = tiny_model("llama", layers=6)
    batches = [prompts(model.config.vocab_size, batch) for batch in (1, 3)]
    results = [compiled_generate_on_rank(0, "llama", 1, batches, True, model)]
    assert_generates(results, hf_tokens(model, batches))
    generator = fxtp.compile(model, 1).generator(0, device="cuda", compile=True)
    ids, mask = batches[1]
    generator.generate(ids.cuda(), mask.cuda(), max_new_tokens=2)
    assert generator._decode.compiled.regions == generator._prefill.compiled.regions == (8, 3)
    generator.generate(ids[:2].cuda(), mask[:2].cuda(), max_new_tokens=300)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generator.generate(ids.cuda(), mask.cuda(), max_new_tokens=600)
    assert generator._key == (3, 768) and generator._prefill.new_kinds == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 3  # the decode step's kinds only


# HF's generate driving fxtp's compiled step (fxtp.parallelize): beam search reorders the cache that
# the CUDA graph reads, in place
@needs_gpus(1)
def test_hf_generate_drives_the_compiled_step_like_hf():
    model = tiny_model("llama", noise=0.05).cuda()
    sharded = fxtp.parallelize(model, 1, compile=True)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for options in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **options)
        got = sharded.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **options)
        assert torch.equal(got, expected), (options, got.tolist(), expected.tolist())
    assert sharded.fxtp_runtime.generator.compile_options is not None


# a bare "cuda" is the current GPU: inputs moved with .to("cuda") (which then say cuda:0) are accepted
@needs_gpus(1)
def test_a_bare_cuda_device_is_the_current_gpu():
    model = tiny_model("llama", noise=0.05).cuda()
    ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0)).to("cuda")
    sharded = fxtp.parallelize(model, 1, device="cuda")
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(sharded.generate(ids, max_new_tokens=4, do_sample=False), expected)
    generator = sharded.fxtp_runtime.program.generator(0, "cuda")
    assert torch.equal(generator.generate(ids, max_new_tokens=4), expected)


# a checkpoint read onto the GPU (copied from the file's pages straight to the device) holds what the
# CPU's reading holds, at every rank of an uneven split and for a checkpoint of another float dtype
@needs_gpus(1)
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_a_checkpoint_read_onto_the_gpu_holds_what_the_cpu_reads(tmp_path, stored):
    model = tiny_model("llama", noise=0.05)
    model.to(stored).save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = type(model)(model.config).to(torch.float32).eval()
    tp = fxtp.compile(meta, 3)
    for rank in range(3):
        on_gpu = dict(tp.rank_graph(rank, device="cuda", checkpoint=str(tmp_path)).state_dict())
        on_cpu = dict(tp.rank_graph(rank, device="cpu", checkpoint=str(tmp_path)).state_dict())
        assert on_gpu.keys() == on_cpu.keys() and len(on_cpu) > 10
        for name, tensor in on_cpu.items():
            assert on_gpu[name].device.type == "cuda" and on_gpu[name].dtype == torch.float32
            assert torch.equal(on_gpu[name].cpu(), tensor), name
