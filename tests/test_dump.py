"""Golden-file test of `fxtp.dump` for a tiny Llama: any change to the plan, layouts or
collectives shows up as a readable diff. Regenerate with FXTP_UPDATE_GOLDEN=1 after checking it.

The exported graph itself differs between torch/transformers versions (transformers 5.17 builds
rotary embeddings with other ops than 5.24), so the goldens are for the torch and transformers that
CI pins in .ci/constraints.txt, and are named after them. With those versions installed a missing
golden fails the test; with others (a GPU machine's own transformers) it skips and says so."""
import os
from pathlib import Path

import pytest
import torch
import transformers

import fxtp
from fxtp.tiny_configs import tiny_model

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path(__file__).parent.parent
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"


def pinned_versions(names):
    """{name: version} for `names` from the `name==version` lines of CI's constraints file."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.lower() in names:
            pins[name.lower()] = version.strip()
    missing = sorted(set(names) - set(pins))
    assert not missing, f"{CONSTRAINTS} pins no version of {missing}: add `name==version` lines for them"
    return pins


def golden_versions():
    """'torchA.B-transformersC.D' of the pinned versions, or a skip when the installed ones differ."""
    pins = pinned_versions({"torch", "transformers"})
    installed = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    if installed != pins:
        pytest.skip(f"installed torch {installed['torch']} / transformers {installed['transformers']} are not the "
                    f"versions pinned in {CONSTRAINTS.relative_to(ROOT)} (torch {pins['torch']} / transformers {pins['transformers']}), "
                    "for which the golden dumps are written")
    return "-".join(f"{name}{'.'.join(pins[name].split('.')[:2])}" for name in ("torch", "transformers"))


@pytest.mark.parametrize("world_size", [2, 3])
def test_dump_matches_golden(world_size):
    path = GOLDEN / f"llama_1layer_ws{world_size}-{golden_versions()}.txt"
    text = fxtp.dump(fxtp.compile(tiny_model("llama", layers=1), world_size))
    if os.environ.get("FXTP_UPDATE_GOLDEN") == "1":
        path.write_text(text + "\n")
    assert path.exists(), (f"no golden dump {path.name} for the versions CI pins: write it with FXTP_UPDATE_GOLDEN=1 "
                           "and review its diff against the previous pins' golden")
    assert text + "\n" == path.read_text()


def test_dump_marks_collectives_and_reasons():
    text = fxtp.dump(fxtp.compile(tiny_model("llama", layers=1), 2))
    assert text.count("<- all_reduce(") == 2
    assert "collectives in model.layers.0: all_reduce x2" in text
    assert "collectives in (outside layers): all_gather x1, all_reduce x1" in text
    assert "vocab-parallel   model.embed_tokens.weight" in text and "Partial, all_reduce right here" in text
    assert "column-parallel (gathered) lm_head.weight" in text and text.count("<- all_gather(") == 1
    assert "row-parallel" in text and "its input is sharded by the region before it" in text
