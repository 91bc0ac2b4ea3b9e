"""`fxtp.dump` of a model compiled on the meta device: the same text as with its weights, every
rank's state bytes from the plan, and `tp.simulate` asking for a checkpoint."""
import re

import pytest
import torch

import fxtp
from fxtp.stats import state_bytes
from fxtp.tiny_configs import tiny_model


def meta_model(arch: str, **overrides) -> torch.nn.Module:
    with torch.device("meta"):
        return tiny_model(arch, **overrides)


@pytest.mark.parametrize("arch", ["llama", "t5", "bert"])  # a causal LM, a seq2seq LM, an encoder
def test_meta_dump_is_the_dump_with_weights(arch):
    """World size 3 shards unevenly, so every rank's line differs."""
    real = fxtp.dump(fxtp.compile(tiny_model(arch, layers=1), 3))
    meta = fxtp.dump(fxtp.compile(meta_model(arch, layers=1), 3))
    assert meta == real
    assert len(re.findall(r"state bytes on rank \d", meta)) == 3


def test_every_ranks_state_bytes_are_what_its_graph_holds():
    tp = fxtp.compile(tiny_model("llama", layers=1), 3)
    shown = [int(b.replace(",", "")) for b in re.findall(r"state bytes on rank \d: ([\d,]+) of", fxtp.dump(tp))]
    assert shown == [state_bytes(tp.rank_graph(r)) for r in range(3)]
    assert len(set(shown)) > 1  # uneven: rank 0 holds more heads


def test_dump_counts_collectives_on_the_rank_asked_for():
    tp = fxtp.compile(meta_model("llama", layers=1), 2)
    assert fxtp.dump(tp, rank=1) == fxtp.dump(tp)  # every rank runs the same collectives
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        fxtp.dump(tp, rank=2)


def test_simulate_on_meta_asks_for_a_checkpoint_and_runs_with_one(tmp_path):
    model = tiny_model("llama", layers=1)
    model.save_pretrained(tmp_path)
    tp = fxtp.compile(meta_model("llama", layers=1), 2)
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="meta device.*pass checkpoint="):
        tp.simulate(ids)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(tp.simulate(ids, checkpoint=str(tmp_path)), expected, rtol=0, atol=1e-4)
