"""Testing helpers for users and for fxtp's own suite: hypothesis strategies and equivalence checks."""
from __future__ import annotations

import copy
from functools import lru_cache
from typing import Optional

import torch
from hypothesis import strategies as st

import fxtp
from fxtp.capture.export import Captured, capture
from fxtp.tiny_configs import CAUSAL_LMS, tiny_model
from fxtp.runtime.compile_arguments import check_heads
from fxtp.runtime.program import TPProgram
from fxtp.runtime.whole_state import whole_state
from fxtp.capture.signatures import Forward, signature_of

__all__ = ["architectures", "tiny_configs", "world_sizes", "token_batches", "assert_equivalent", "max_abs_diff",
           "tiny_program", "padded_batch", "assert_generates_like_hf", "traced_targets", "assert_trains_like_hf"]


@lru_cache(maxsize=None)
def _tiny(arch: str) -> torch.nn.Module:
    return tiny_model(arch)


@lru_cache(maxsize=None)
def _captured(arch: str) -> Captured:
    return capture(_tiny(arch))


@lru_cache(maxsize=None)
def tiny_program(arch: str, world_size: int) -> tuple[torch.nn.Module, "fxtp.TPProgram"]:
    """(tiny model, its automatic program over `world_size` ranks), built once per process:
    property tests draw many inputs for the same few programs. The model is captured once for
    all world sizes (export is most of fxtp.compile's time); each plans its own copy of the
    graph, since planning annotates it."""
    return _tiny(arch), program_of_capture(_captured(arch), world_size, _tiny(arch))


def program_of_capture(captured: Captured, world_size: int, model: torch.nn.Module) -> "fxtp.TPProgram":
    """fxtp.compile's automatic program from a capture of `model` made once for several world sizes
    (export is most of compile's time): each plans its own copy of the graph, since planning
    annotates it."""
    check_heads(model, world_size)
    captured = copy.copy(captured)
    captured.graph_module = copy.deepcopy(captured.graph_module)
    return TPProgram(captured, world_size, "auto", model)


def architectures(family: tuple = CAUSAL_LMS) -> st.SearchStrategy[str]:
    """Model types with a tiny config in fxtp.tiny_configs (default: all causal LMs)."""
    return st.sampled_from(family)


@st.composite
def tiny_configs(draw, family: tuple = CAUSAL_LMS):
    """(arch, config keywords for fxtp.tiny_configs.tiny_config): heads 2-6, kv heads dividing them,
    head_dim 8 or 16, 1-2 layers; builds a different tiny model per draw."""
    arch = draw(architectures(family))
    heads = draw(st.integers(2, 6))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = draw(st.sampled_from([8, 16]))
    return arch, dict(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, layers=draw(st.integers(1, 2)),
                      intermediate=draw(st.sampled_from([32, 96, 128])))


def world_sizes(max_size: int = 4) -> st.SearchStrategy[int]:
    """1..max_size; with 4 heads and 2 kv heads, 3 gives uneven shards and kv kept replicated."""
    return st.integers(1, max_size)


@st.composite
def token_batches(draw, vocab: int = 256, max_batch: int = 4, max_seq: int = 64):
    """(input_ids, attention_mask): random ids (0 avoided: a pad id in several configs) and a
    left-padding mask that keeps at least one real token per row, or None."""
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(1, max_seq))
    seed = draw(st.integers(0, 2**31 - 1))
    ids = torch.randint(1, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    if not draw(st.booleans()):
        return ids, None
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        mask[row, : draw(st.integers(0, seq - 1))] = 0
    return ids, mask


def padded_batch(model: torch.nn.Module, batch: int = 3, seq: int = 17, seed: int = 0) -> dict:
    """One input of each name the model's kind takes (fxtp.capture.signatures): random ids (0 avoided),
    the first row left-padded by a third, token types 0 then 1, and for seq2seq a shorter
    decoder sequence whose second row is padded."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    names = signature_of(model).inputs
    values = dict(input_ids=torch.randint(1, vocab, (batch, seq), generator=g))
    values["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    values["attention_mask"][0, :(seq + 1) // 3] = 0
    if "token_type_ids" in names:
        values["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
    if "decoder_input_ids" in names:
        values["decoder_input_ids"] = torch.randint(1, vocab, (batch, max(2, seq - 4)), generator=g)
        values["decoder_attention_mask"] = torch.ones_like(values["decoder_input_ids"])
        values["decoder_attention_mask"][min(1, batch - 1), :2] = 0
    return values


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_equivalent(model: torch.nn.Module, world_size: int, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None, *, atol: float = 1e-4,
                      program: Optional["fxtp.TPProgram"] = None, **inputs: Optional[torch.Tensor]) -> float:
    """Check that every rank of the sharded model (simulated) returns the unsharded model's output
    (logits, or an encoder's hidden states); returns the max abs difference. `inputs` are the
    model's other inputs by name (decoder_input_ids=..., token_type_ids=...)."""
    tp = program if program is not None else fxtp.compile(model, world_size)
    with torch.no_grad():
        expected = Forward(model, signature_of(model))(input_ids, attention_mask, **inputs)
    outputs = tp.simulate_ranks(input_ids, attention_mask, **inputs)
    for rank, out in enumerate(outputs):
        if out.shape != expected.shape:
            raise AssertionError(f"rank {rank}: output shape {tuple(out.shape)} != {tuple(expected.shape)}")
        if not torch.equal(out, outputs[0]):
            raise AssertionError(f"rank {rank} differs from rank 0 by {max_abs_diff(out, outputs[0]):.3e}")
    diff = max_abs_diff(outputs[0], expected)
    if not diff <= atol:
        raise AssertionError(f"world_size={world_size}: max abs diff {diff:.3e} > {atol:.1e} "
                             f"(input {tuple(input_ids.shape)}, mask={'yes' if attention_mask is not None else 'no'})")
    return diff


def assert_generates_like_hf(model: torch.nn.Module, world_size: int, input_ids: torch.Tensor,
                             attention_mask: Optional[torch.Tensor] = None, *, max_new_tokens: int = 10,
                             program: Optional["fxtp.TPProgram"] = None) -> torch.Tensor:
    """Check that greedy generation by the sharded model (every rank simulated, KV cache sharded)
    gives the tokens of the unsharded model's `generate`; returns them."""
    tp = program if program is not None else fxtp.compile(model, world_size)
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False)
    got = tp.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens)
    if not torch.equal(got, expected):
        first = (got != expected).any(dim=0).nonzero()[0].item() if got.shape == expected.shape else None
        raise AssertionError(f"world_size={world_size}: generated tokens differ from model.generate"
                             + (f" from position {first}" if first is not None else f": shapes {tuple(got.shape)} "
                                                                                     f"!= {tuple(expected.shape)}")
                             + f"\nfxtp: {got.tolist()}\nHF:   {expected.tolist()}")
    return got


def traced_targets(fn, *args) -> tuple:
    """(fn(*args) compiled, the targets of the graph torch.compile traced): what a decode step's
    compilation (static shapes) sees of `fn` at these arguments."""
    graphs = []

    def record(gm: torch.fx.GraphModule, example_inputs: list):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=record, dynamic=False)(*args)
    return out, [node.target for node in graphs[0].graph.nodes]


def assert_trains_like_hf(model: torch.nn.Module, world_size: int, input_ids: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], labels: torch.Tensor, *, seed: int = 0,
                          program: Optional["fxtp.TPProgram"] = None, rtol: float = 1e-5) -> tuple[float, float]:
    """Check one training step of the sharded model (every rank simulated, each differentiating its own
    loss) against the unsharded model in train mode under the same seed (dropout included): every rank's
    loss within `rtol` of HF's, and every parameter's gradient, put together from the ranks, within
    `rtol` of HF's, relative to that gradient's largest value, or to 1e-4 for a gradient smaller than that
    (a key bias's gradient is zero in exact arithmetic, since softmax ignores it, and only rounding
    noise in float). Returns (loss difference, largest gradient difference), both relative."""
    tp = program if program is not None else fxtp.compile(model, world_size, training=True)
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.train()
    try:
        torch.manual_seed(seed)
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        expected_grads = dict(zip([n for n, p in model.named_parameters() if p.requires_grad],
                                  torch.autograd.grad(expected, params, allow_unused=True)))
    finally:
        model.train(was_training)
    modules = tp.lockstep_modules(input_ids.device)
    for module in modules:
        module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = [out[0] for out in tp.simulate_ranks(input_ids, attention_mask, labels)]
    torch.autograd.backward(losses)
    loss_diff = max(abs(loss.item() - expected.item()) for loss in losses) / abs(expected.item())
    if not loss_diff <= rtol:
        raise AssertionError(f"world_size={world_size}: losses {[loss.item() for loss in losses]} != {expected.item()}")
    grads = whole_state(tp, [{name: p.grad for name, p in module.named_parameters()} for module in modules])
    worst = 0.0
    for name, expected_grad in expected_grads.items():
        if expected_grad is None:
            continue
        if name not in grads:
            raise AssertionError(f"world_size={world_size}: no rank has a gradient for {name}")
        scale = max(expected_grad.abs().max().item(), 1e-4)
        diff = max_abs_diff(grads[name], expected_grad) / scale
        if not diff <= rtol:
            raise AssertionError(f"world_size={world_size}: the gradient of {name} is {diff:.2e} off (relative)")
        worst = max(worst, diff)
    return loss_diff, worst
