"""Forwards that constrain a dynamic dim: a multiple or a bound is captured with torch's suggested
fixes (fxtp/capture/shape_constraints.py), one fixed length is refused in words."""
import logging
import re

import pytest
import torch
from torch import nn
from torch.export import Dim

import fxtp

VOCAB = 64
NAMED = ({0: Dim("batch", max=64), 1: Dim("seq", max=256)},)  # a user's named Dims: torch suggests fixes


class Chunked(nn.Module):
    """An MLP LM that mixes tokens within chunks of 4 positions: the length must be a multiple of 4."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, VOCAB)

    def mix(self, x):
        b, n, d = x.shape
        return x.reshape(b, n // 4, 4, d).cumsum(2).reshape(b, n, d)

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.up(self.mix(self.embed(ids))))))


class Bounded(Chunked):
    """At most 32 positions (a table of 32 positions would say so by indexing)."""

    def mix(self, x):
        torch._check(x.shape[1] <= 32)
        return x


class Unrolled(Chunked):
    """A Python loop over the positions: export unrolls it for the example's length."""

    def mix(self, x):
        return torch.stack([x[:, : t + 1].mean(1) for t in range(x.shape[1])], 1)


def ids(batch, seq):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))


@pytest.mark.parametrize("module, lengths", [(Chunked, (8, 12, 4)), (Bounded, (16, 32, 3))])
def test_suggested_fixes_are_applied_and_exact(module, lengths):
    torch.manual_seed(0)
    model = module().eval()
    tp = fxtp.compile(model, 2, example_inputs=(ids(2, 8),), dynamic_shapes=NAMED)
    for seq in lengths:
        x = ids(3, seq)
        torch.testing.assert_close(tp.simulate(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dynamic_shapes, dim", [(None, r"ids\.size\(1\)"), (NAMED, "seq")])
def test_a_fixed_length_is_refused_in_words(dynamic_shapes, dim):
    with pytest.raises(fxtp.CaptureError) as refused:
        fxtp.compile(Unrolled(), 2, example_inputs=(ids(2, 8),), dynamic_shapes=dynamic_shapes)
    words = str(refused.value).split("\n\ntorch.export:")[0]  # fxtp's part; torch's own follows
    assert "TORCH_LOGS" not in words
    assert re.search(rf"could not capture Unrolled: its forward fixes {dim} to 8 at test_shape_constraints\.py:\d+ "
                     rf"in (<listcomp>|mix) \(the example's size\), a dim fxtp declares dynamic\.", words), words


def test_shape_log_is_left_as_found():
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    before = (list(log.handlers), log.level, log.propagate, log.isEnabledFor(logging.INFO))
    with pytest.raises(fxtp.CaptureError):
        fxtp.compile(Unrolled(), 2, example_inputs=(ids(2, 8),))
    assert (list(log.handlers), log.level, log.propagate, log.isEnabledFor(logging.INFO)) == before
