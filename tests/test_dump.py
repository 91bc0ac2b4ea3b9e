"""Golden-file test of `fxtp.dump` for a tiny Llama: any change to the plan, layouts or
collectives shows up as a readable diff. Regenerate with FXTP_UPDATE_GOLDEN=1 after checking it.

The exported graph itself differs between torch/transformers versions (transformers 5.17 builds
rotary embeddings with other ops than 5.24), so goldens are kept per version pair."""
import os
from pathlib import Path

import pytest
import torch
import transformers

import fxtp
from fxtp.tiny_configs import tiny_model

GOLDEN = Path(__file__).parent / "golden"
VERSIONS = f"torch{'.'.join(torch.__version__.split('.')[:2])}-transformers{'.'.join(transformers.__version__.split('.')[:2])}"


@pytest.mark.parametrize("world_size", [2, 3])
def test_dump_matches_golden(world_size):
    text = fxtp.dump(fxtp.compile(tiny_model("llama", layers=1), world_size))
    path = GOLDEN / f"llama_1layer_ws{world_size}-{VERSIONS}.txt"
    if os.environ.get("FXTP_UPDATE_GOLDEN") == "1":
        path.write_text(text + "\n")
    if not path.exists():
        pytest.skip(f"no golden dump for {VERSIONS}: write one with FXTP_UPDATE_GOLDEN=1 and review it")
    assert text + "\n" == path.read_text()


def test_dump_marks_collectives_and_reasons():
    text = fxtp.dump(fxtp.compile(tiny_model("llama", layers=1), 2))
    assert text.count("<- all_reduce(") == 2
    assert "collectives in model.layers.0: all_reduce x2" in text
    assert "collectives in (outside layers): all_gather x1, all_reduce x1" in text
    assert "vocab-parallel   model.embed_tokens.weight" in text and "Partial, all_reduce right here" in text
    assert "column-parallel (gathered) lm_head.weight" in text and text.count("<- all_gather(") == 1
    assert "row-parallel" in text and "its input is sharded by the region before it" in text
