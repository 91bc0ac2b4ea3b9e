"""fxtp/decode/compiled_graph.py: a compiled rank graph's call raises the error its step raised, not
dynamo's `Attempt to trace generator`; its other errors and its results pass through."""
import pytest
import torch
import torch.fx as fx

from fxtp.decode.compiled_graph import compile_graph


@torch.library.custom_op("fxtp_test::refuses", mutates_args=())
def refuses(x: torch.Tensor) -> torch.Tensor:
    """Stands for an op that fails only when it runs (as a host sync under CUDA-graph capture)."""
    if (x < 0).any():
        raise ValueError("the step's own error")
    return x * 2


refuses.register_fake(lambda x: torch.empty_like(x))


class Step(torch.nn.Module):
    def forward(self, x):
        return torch.ops.fxtp_test.refuses(x) + 1


@torch.compiler.disable
def not_traced(x):
    return x + 1


torch.fx.wrap("not_traced")


class BreakingStep(torch.nn.Module):
    def forward(self, x):
        return not_traced(x)


def test_the_call_raises_the_error_its_step_raised():
    compiled = compile_graph(fx.symbolic_trace(Step()), fullgraph=True, dynamic=False, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    with pytest.raises(ValueError, match="the step's own error"):
        compiled(-torch.ones(3))


def test_dynamo_errors_of_its_own_pass_through():
    compiled = compile_graph(fx.symbolic_trace(BreakingStep()), fullgraph=True, dynamic=False, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        compiled(torch.ones(3))
