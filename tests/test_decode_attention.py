"""fxtp::decode_attention (fxtp/kernels/decode_attention.py).

Its Triton kernel runs on the GPU, or without one on CPU tensors in Triton's interpreter (which
tests/conftest.py turns on), counted as it launches (fxtp/kernels/launches.py), against SDPA over
repeated k and v: one split of the keys and several, no mask, left padding as a bool mask, per-head
additive masks, rows with every key masked, bf16, and arrival counters reused from call to call.
Outside the interpreter, on GPUs before Ampere, and for shapes the kernel does not cover, the op is
grouped_query_attention. The graph rewrite is checked on tiny Llama rank graphs. tests/test_cuda.py
runs the op from CUDA-graph replays, launched with and without PDL.
"""
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fxtp.capture.static_cache import is_cache_state
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.kernels import decode_attention as attention
from fxtp.kernels.launches import counting_launches
from fxtp.kernels.triton_device import runs_triton_kernels
from fxtp.passes.decode.retarget import with_decode_attention
from fxtp.rank_ops.grouped_query import grouped_query_attention
from fxtp.runtime.simulate import simulate
from fxtp.testing import tiny_program

op = torch.ops.fxtp.decode_attention


@pytest.fixture
def device() -> torch.device:
    """Where the kernel runs: the GPU, else the CPU in Triton's interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter is off (tests/conftest.py turns it on before triton is imported)")
    return torch.device("cpu")


@pytest.fixture
def launches():
    """The kernel launches of the test (fxtp/kernels/launches.py): the kernel, not its fallback, ran."""
    with counting_launches() as counter:
        yield counter


def inputs(batch, heads, groups, rows, length, dim, mask, dtype=torch.float32, seed=0) -> tuple:
    """(query, key, value, attn_mask) on the CPU. mask "bool": [b, 1, s, L], each query row's leading
    keys False (left padding); "additive": [b, hq, s, L] normal scores, leading keys at the dtype's min."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, rows, dim, generator=generator)
    key, value = (torch.randn(batch, groups, 1, length, dim, generator=generator) for _ in range(2))
    padded = torch.arange(length) < torch.randint(0, length, (batch, rows, 1), generator=generator)  # [b, s, L]
    attn_mask = {"none": None, "bool": ~padded[:, None],
                 "additive": torch.randn(batch, heads, rows, length, generator=generator)
                 .masked_fill(padded[:, None], torch.finfo(dtype).min).to(dtype)}[mask]
    return query.to(dtype), key.to(dtype), value.to(dtype), attn_mask


def on(device: torch.device, *tensors) -> list:
    return [None if t is None else t.to(device) for t in tensors]


def sdpa_over_repeated_heads(query, key, value, attn_mask, scale=None) -> torch.Tensor:
    repeats = query.size(1) // key.size(1)
    key, value = (t.expand(-1, -1, repeats, -1, -1).flatten(1, 2) for t in (key, value))
    return F.scaled_dot_product_attention(query, key, value, attn_mask, scale=scale)


def assert_within_rounding(got, query, key, value, attn_mask):
    """16-bit `got` against float32 attention rounded to its dtype. The kernel rounds p to the input
    dtype before p @ v (relative error at most eps: truncated in the interpreter, rounded on GPUs),
    which moves an output by at most eps * (attention of |v|); its output rounding and the
    reference's add at most eps * |exact| each. Everything else is float32."""
    eps = torch.finfo(got.dtype).eps
    query, key, value = (t.float() for t in (query, key, value))
    attn_mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.float()
    exact = sdpa_over_repeated_heads(query, key, value, attn_mask)
    spread = sdpa_over_repeated_heads(query, key, value.abs(), attn_mask)
    error = (got.float() - exact.to(got.dtype).float()).abs()
    assert (error <= eps * (spread + 2 * exact.abs()) + 1e-6).all(), error.max()


# batch and query rows are separate axes of the kernel's grid and of a program: the default suite
# pairs them as (1, 1) and (3, 2), every other value crossed with both; the other pairs run with FXTP_SLOW=1
SHAPES = [pytest.param(batch, heads, groups, rows, length, dim,
                       marks=() if (batch, rows) in ((1, 1), (3, 2)) else pytest.mark.slow)
          for batch, (heads, groups), rows, length, dim in itertools.product(
              (1, 3), ((4, 1), (8, 2), (4, 4)), (1, 2), (1, 17, 64, 300, 1100), (64, 128))
          if not (length == 1100 and dim == 128)]  # the interpreter's slowest; covered by 1100 at 64 and 300 at 128


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize("batch, heads, groups, rows, length, dim", SHAPES)
def test_kernel_equals_sdpa_over_repeated_heads(device, launches, batch, heads, groups, rows, length, dim, mask):
    args = inputs(batch, heads, groups, rows, length, dim, mask, seed=length + dim)
    got = op(*on(device, *args))
    assert launches == {"decode_attention": 1}
    torch.testing.assert_close(got.cpu(), sdpa_over_repeated_heads(*args), atol=1e-5, rtol=0)


def test_split_rule():
    """Splits until there are 128 programs, but beyond 4 splits none under 128 keys, and at most 16;
    none empty."""
    assert attention.split_keys(256, programs=8) == (64, 4)  # Llama-3-8B, batch 1, one GPU
    assert attention.split_keys(1024, programs=4) == (128, 8)  # the same on 2 GPUs, a longer cache
    assert attention.split_keys(8192, programs=8) == (512, 16)
    assert attention.split_keys(4096, programs=32) == (1024, 4)  # batch 8 on 2 GPUs
    assert attention.split_keys(8192, programs=256) == (8192, 1)  # batch 32 on one GPU
    assert attention.split_keys(256, programs=64) == (128, 2)
    assert attention.split_keys(300, programs=1) == (128, 3)  # 4 wanted, but 5 blocks make 3 whole splits
    assert attention.split_keys(40, programs=1) == (64, 1)
    for length, programs in itertools.product(range(1, 5000, 7), (1, 3, 8, 32, 100, 128)):
        chunk, splits = attention.split_keys(length, programs)
        assert chunk % attention.BLOCK_KEYS == 0 and splits <= attention.MAX_SPLITS
        assert (splits - 1) * chunk < length <= splits * chunk  # no split is empty
        assert splits == 1 or programs * (splits - 1) < attention.TARGET_PROGRAMS


def test_the_split_target_follows_the_gpus_sm_count(monkeypatch):
    """About one program per SM: the largest power of two within the SM count (H100 and H200: 132 SMs,
    the 128 the rule was timed with; A100: 108 SMs, 64), the same 128 where there are none."""
    from types import SimpleNamespace
    for sms, target in ((132, 128), (108, 64), (58, 32), (256, 256)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=sms))
        attention.target_programs.cache_clear()
        assert attention.target_programs(torch.device("cuda", 0)) == target
    attention.target_programs.cache_clear()
    assert attention.target_programs(torch.device("cpu")) == attention.TARGET_PROGRAMS
    assert attention.split_keys(8192, programs=8, target=64) == (1024, 8)  # 8 splits make 64 programs
    assert attention.split_keys(8192, programs=8) == (512, 16)


def test_one_split_walks_several_blocks_of_keys(device, launches):
    """128 programs already (batch 64 * 2 kv heads): one split, whose program walks 4 blocks."""
    args = inputs(64, 2, 2, 1, 256, 16, "bool", seed=3)
    assert attention.split_keys(256, programs=64 * 2) == (256, 1)
    torch.testing.assert_close(op(*on(device, *args)).cpu(), sdpa_over_repeated_heads(*args), atol=1e-5, rtol=0)
    assert launches == {"decode_attention": 1}


def test_scale_and_a_mask_row_broadcast_to_every_query_row_and_head(device, launches):
    """A decode step's mask: one row per sequence, expanded (stride 0) over heads and query rows."""
    query, key, value, _ = inputs(2, 8, 2, 2, 300, 64, "none")
    attn_mask = (torch.arange(300) >= torch.tensor([[5], [280]]))[:, None, None].expand(2, 1, 2, 300)
    got = op(*on(device, query, key, value, attn_mask), scale=0.3)
    assert launches == {"decode_attention": 1}
    torch.testing.assert_close(got.cpu(), sdpa_over_repeated_heads(query, key, value, attn_mask, scale=0.3),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask", ["bool", "additive"])
@pytest.mark.parametrize("length", [17, 600])
def test_a_row_with_every_key_masked_gives_zero_as_sdpa_does_on_the_cpu(device, launches, length, mask):
    query, key, value, _ = inputs(2, 4, 2, 2, length, 64, "none")
    attends = torch.rand(2, 4, 2, length, generator=torch.Generator().manual_seed(1)) > 0.5
    attends[0, 1, 1] = False  # a row that attends nothing
    attends[1, :, 0, :min(length, 400)] = False  # rows with nothing in the first split(s)
    attn_mask = attends if mask == "bool" else torch.zeros(attends.shape).masked_fill(~attends, float("-inf"))
    got = op(*on(device, query, key, value, attn_mask)).cpu()
    assert launches == {"decode_attention": 1}
    assert not got.isnan().any() and (got[0, 1, 1] == 0).all()
    torch.testing.assert_close(got, sdpa_over_repeated_heads(query, key, value, attn_mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [64, 300])
def test_bfloat16_within_its_rounding(device, launches, length):
    args = inputs(3, 8, 2, 2, length, 128, "bool", dtype=torch.bfloat16)
    got = op(*on(device, *args)).cpu()
    assert got.dtype == torch.bfloat16 and launches == {"decode_attention": 1}
    assert_within_rounding(got, *args)


def test_calls_reuse_the_arrival_counters(device, launches):
    """The last program of a group sets its counter back to 0: otherwise the next call's last
    program would not see itself last, and its output would stay unwritten."""
    results = []
    for seed, length in itertools.product(range(3), (600, 1100)):  # 4 and 6 splits on the same counters
        args = inputs(1, 8, 2, 2, length, 64, "bool", seed=seed)
        placed = on(device, *args)
        results.append((op(*placed).cpu(), sdpa_over_repeated_heads(*args)))
        counters = attention.arrival_counters(placed[0].device, 2)
        assert counters.tolist() == [0, 0]
        if seed == 0 and length == 600:
            first_counters = counters
    assert counters is first_counters and launches == {"decode_attention": 6}
    for got, expected in results:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_opcheck_on_the_kernel_and_the_fallback(device):
    """Schema, fake tensor (what torch.compile traces with) and the real op agree, where the kernel
    runs (2 query rows) and where it falls back (18 folded rows)."""
    for args, kernel in ((inputs(2, 4, 2, 2, 300, 64, "bool"), True), (inputs(2, 4, 2, 9, 40, 64, "additive"), False)):
        with counting_launches() as launches:
            torch.library.opcheck(op.default, on(device, *args), {"scale": 0.5})
        assert (launches["decode_attention"] > 0) is kernel


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_inductor_computes_a_mask_that_layers_share_once(device):
    """Compiled, two layers' ops read one mask buffer: the op's layout is flexible, where inductor's
    default for custom ops would compute a copy of the mask at every op."""
    from torch._inductor.utils import run_and_get_code

    def two_layers(query, key, value, padding):
        mask = (padding > 0)[:, None, None, :].expand(1, 4, 1, 40)  # computed and broadcast in the step
        return op(op(query, key, value, mask), key, value, mask)

    query, key, value, _ = on(device, *inputs(1, 4, 2, 1, 40, 16, "none"))
    padding = torch.arange(40, device=device)[None].float()
    torch._dynamo.reset()
    # fx_graph_cache off: the cache's key does not hold the op's tags
    with torch._inductor.config.patch(fx_graph_cache=False), counting_launches() as launches:
        out, code = run_and_get_code(torch.compile(two_layers, dynamic=False), query, key, value, padding)
    assert launches == {"decode_attention": 2}
    torch.testing.assert_close(out, two_layers(query, key, value, padding), rtol=1e-5, atol=1e-5)
    masks = re.findall(r"decode_attention\.default\(\w+, \w+, \w+, reinterpret_tensor\((\w+),", code[0])
    assert len(masks) == 2 and masks[0] == masks[1], masks


def test_outside_the_interpreter_cpu_tensors_get_grouped_query_attention(monkeypatch, launches):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = inputs(3, 8, 2, 2, 300, 64, "bool")
    assert torch.equal(op(*args), grouped_query_attention(*args))
    assert launches == {}


def test_gpus_before_ampere_get_grouped_query_attention(monkeypatch):
    """Triton's bfloat16 dot needs sm80: older GPUs keep the graph's attention."""
    for capability, runs in [((7, 5), False), ((8, 0), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert runs_triton_kernels(torch.device("cuda", 0)) is runs


@pytest.mark.parametrize("shape", [(2, 4, 2, 9, 40, 64), (1, 4, 2, 1, 40, 512)], ids=["18_rows", "head_dim_512"])
def test_shapes_the_kernel_does_not_cover_get_grouped_query_attention(device, launches, shape):
    args = on(device, *inputs(*shape, "bool"))
    assert torch.equal(op(*args), grouped_query_attention(*args))
    assert launches == {}


def test_rewrite_replaces_every_grouped_query_attention_and_shares_the_weights():
    _, tp = tiny_program("llama", 2)  # 4 heads over 2 kv heads: 2 over 1 on a rank
    module = tp.rank_graph(0)
    rewritten = with_decode_attention(module)
    before = [n.target for n in module.graph.nodes]
    after = [n.target for n in rewritten.graph.nodes]
    layers = tp.model.config.num_hidden_layers
    assert before.count(grouped_query_attention) == layers  # and the module is left as it was
    assert grouped_query_attention not in after and after.count(op.default) == layers
    assert len(before) == len(after)
    assert all(a is b for a, b in zip(rewritten.parameters(), module.parameters()))


@pytest.mark.parametrize("push", [False, True])
def test_decode_graph_option_rewrites_the_step(monkeypatch, push):
    """fxtp/decode/decode_graph.py with `decode_attention` on (by default) or off, with and without
    push all_reduce: the step it compiles calls the op, or the graph's attention."""
    compiled = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.update(module=module, **kwargs))
    module = tiny_program("llama", 2)[1].rank_graph(0)
    for attention_on in (True, False):
        DecodeGraph(module, resolve(DecodeOptions(push_all_reduce=push, decode_attention=attention_on), 2, True))
        targets = [n.target for n in compiled["module"].graph.nodes]
        assert targets.count(op.default) == (2 if attention_on else 0)
        assert targets.count(grouped_query_attention) == (0 if attention_on else 2)
        assert (torch.ops.fxtp.push_all_reduce.default in targets) == push


def test_importing_the_decode_step_registers_every_op_it_calls():
    """In a fresh interpreter: the rewrites of fxtp/decode/decode_graph.py call fxtp's ops by name
    (torch.ops.fxtp.*), which exist once the modules that define them are imported."""
    ops = ["decode_attention", "gemv", "rotary_gemv", "push_all_reduce", "push_all_reduce_add_rms_norm",
           "gemv_push_all_reduce", "gemv_push_all_reduce_add_rms_norm"]
    script = f"import torch, fxtp.decode.decode_graph; print([hasattr(torch.ops.fxtp, name) for name in {ops!r}])"
    found = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert found.strip() == str([True] * len(ops))


def prefill_and_decode(modules: list, batch: int, length: int, device: torch.device) -> list:
    """Logits of a left-padded 5-token prefill and 2 decode steps through `modules` (every rank, in
    lockstep), from an empty cache."""
    for module in modules:
        for name, buffer in module.named_buffers():
            if is_cache_state(name):
                buffer.zero_()
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :2] = 0
    positions = (mask[:, :5].cumsum(-1) - 1).masked_fill(mask[:, :5] == 0, 1)
    steps = [(torch.randint(3, 200, (batch, 5), generator=generator), mask, positions, torch.arange(5))]
    steps += [(torch.randint(3, 200, (batch, 1), generator=generator), mask, positions[:, -1:] + i,
               torch.tensor([4 + i])) for i in (1, 2)]
    with torch.no_grad():
        return [simulate(modules, tuple(on(device, *step)), {})[0].cpu() for step in steps]


@pytest.mark.parametrize("kernel", [False, True], ids=["fallback", "kernel"])
def test_rewritten_steps_compute_the_same_logits(request, monkeypatch, launches, kernel):
    """Tiny Llama at 2 ranks with a 300-token cache (two splits), every rank in this process: the
    rewritten prefill and decode steps give the original's logits, bit for bit where the op falls
    back to grouped_query_attention (CPU tensors outside the interpreter), within 1e-5 from the kernel."""
    if kernel:
        device = request.getfixturevalue("device")
    else:
        device = torch.device("cpu")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, tp = tiny_program("llama", 2)
    program = tp.with_cache(2, 300)
    modules = [program.rank_graph(rank, device=device) for rank in range(2)]
    rewritten = [with_decode_attention(module) for module in modules]
    got, expected = prefill_and_decode(rewritten, 2, 300, device), prefill_and_decode(modules, 2, 300, device)
    for step_got, step_expected in zip(got, expected):
        if kernel:
            torch.testing.assert_close(step_got, step_expected, atol=1e-5, rtol=0)
        else:
            assert torch.equal(step_got, step_expected)
    layers, ranks, steps = tp.model.config.num_hidden_layers, 2, 3
    assert launches == ({"decode_attention": layers * ranks * steps} if kernel else {})
