"""Golden-file test of `fxtp.dump` for a tiny Llama: any change to the plan, layouts or
collectives shows up as a readable diff. Regenerate with FXTP_UPDATE_GOLDEN=1 after checking it."""
import os
from pathlib import Path

import pytest

import fxtp
from fxtp.configs import tiny_model

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("world_size", [2, 3])
def test_dump_matches_golden(world_size):
    text = fxtp.dump(fxtp.compile(tiny_model("llama", layers=1), world_size))
    path = GOLDEN / f"llama_1layer_ws{world_size}.txt"
    if os.environ.get("FXTP_UPDATE_GOLDEN") == "1":
        path.write_text(text + "\n")
    assert text + "\n" == path.read_text()


def test_dump_marks_collectives_and_reasons():
    text = fxtp.dump(fxtp.compile(tiny_model("llama", layers=1), 2))
    assert text.count("<- all_reduce(") == 2
    assert "collectives in model.layers.0: all_reduce x2" in text
    assert "collectives in (outside layers): all_gather x1, all_reduce x1" in text
    assert "vocab-parallel   model.embed_tokens.weight" in text and "Partial, all_reduce right here" in text
    assert "column-parallel (gathered) lm_head.weight" in text and text.count("<- all_gather(") == 1
    assert "row-parallel" in text and "its input is sharded by the region before it" in text
