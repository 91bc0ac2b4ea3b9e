"""Capture: dynamic shapes, the meta device, and the cleanups applied to exported graphs."""
import torch

import fxtp
from fxtp.capture.export import capture
from fxtp.node_meta import STATE
from fxtp.tiny_configs import tiny_model
from fxtp.passes.capture.inline_wrappers import inline_wrappers
from fxtp.passes.capture.spread_as_sums import SPREADS, spread_as_sums


class AutocastOff(torch.nn.Module):
    """HF's rotary embedding pattern: no_grad around autocast(enabled=False)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        with torch.no_grad():
            y = x.float() * 2
            with torch.autocast("cpu", enabled=False):
                z = y.cos()
        return (x * self.weight + z).sin()


def test_inline_wrappers_removes_autocast_bodies():
    module = AutocastOff()
    gm = torch.export.export(module, (torch.randn(3, 4),), strict=False).graph_module
    assert any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in gm.graph.nodes)
    gm = inline_wrappers(gm)
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)
    assert {n.target for n in gm.graph.nodes if n.op == "call_function"} >= {torch.ops.aten.cos.default}
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(module.weight, x)[0], module(x))


def test_capture_names_state_like_the_model_and_is_dynamic():
    model = tiny_model("llama", layers=1)
    captured = capture(model)
    assert set(dict(model.named_parameters())) <= set(captured.state)
    ids, mask = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder" and STATE not in n.meta]
    assert all(isinstance(s, torch.SymInt) for s in ids.meta["val"].shape)


def test_capture_on_meta_plans_like_real_weights():
    real = fxtp.compile(tiny_model("llama", layers=1), 2)
    with torch.device("meta"):
        meta = fxtp.compile(tiny_model("llama", layers=1), 2)
    assert [g.role for g in real.plan.groups] == [g.role for g in meta.plan.groups]
    assert all(v.device.type == "meta" for v in meta.captured.state.values())


class Spreads(torch.nn.Module):
    """Standard deviations and variances: over the last dim after a mean of it (which they share), over
    two dims, biased, with a correction, of a bfloat16 input, over every dim (the batch's symbolic), and
    two over dim 1 (the second shares the first's mean)."""

    def forward(self, x):
        return (x.mean(-1, keepdim=True) + x.std(-1, keepdim=True), x.var(dim=(1, 2)), x.std(-1, unbiased=False),
                torch.var(x, -1, correction=3, keepdim=True), x.to(torch.bfloat16).std(1), x.var(),
                x.var(1, keepdim=True) * x.std(1, keepdim=True))


def test_spreads_become_sums_of_the_same_values():
    aten = torch.ops.aten
    x = torch.randn(2, 5, 6) + 3
    gm = torch.export.export(Spreads(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).graph_module
    gm = spread_as_sums(gm)
    spreads = [n for n in gm.graph.nodes if n.target in SPREADS]
    assert len(spreads) == 1 and not spreads[0].args[1:]  # the one over the batch: its count is symbolic
    # means: the model's own (read by the three over the last dim), one over two dims, one of the bfloat16 std
    # and one over dim 1
    assert sum(n.target is aten.mean.dim for n in gm.graph.nodes) == 4
    for batch in (2, 3):
        x = torch.randn(batch, 5, 6) + 3
        for got, expected in zip(gm(x), Spreads()(x)):
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, **({} if expected.dtype is torch.bfloat16 else {"rtol": 0, "atol": 1e-6}))
