"""tp.module(rank) on real processes joined by gloo (fxtp.runtime.rank_processes), its process-group checks, and the CLI.

The rank functions below run in spawned processes, which import this file by module name, so
they must stay at module level.
"""
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import fxtp
from fxtp.cli import main
from fxtp.tiny_configs import tiny_config, tiny_model
from fxtp.runtime.rank_processes import RankFailure, run_ranks

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
TOLERANCE = 1e-4


def left_padded_batch(vocab_size=256):
    ids = torch.randint(1, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return ids, mask


def sharded_logits(rank, ids, mask):
    """Rank body: compile the seeded tiny llama for 2 ranks and run this rank's module."""
    gm = fxtp.compile(tiny_model("llama"), 2).module(rank)
    with torch.no_grad():
        logits = gm(ids, mask)
    return logits, sum(1 for n in gm.graph.nodes if n.target is ALL_REDUCE)


def module_or_raise(rank, compiled_world_size):
    """Rank body: tp.module(rank) for a program compiled for `compiled_world_size` ranks."""
    fxtp.compile(tiny_model("llama"), compiled_world_size).module(rank)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.slow  # `fxtp demo`, which CI runs before the tests, checks 2 real processes against the model
def test_real_processes_match_the_unsharded_model(llama):
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = llama(input_ids=ids, attention_mask=mask).logits
    outputs = run_ranks(sharded_logits, 2, ids, mask)
    for rank, (logits, all_reduces) in enumerate(outputs):
        assert all_reduces > 0, "the rank graph has no collectives, so nothing was sharded"
        assert logits.shape == expected.shape
        diff = (logits - expected).abs().max().item()
        assert diff <= TOLERANCE, f"rank {rank}: max |diff| {diff:.2e}"


def test_module_without_a_process_group_says_how_to_launch(llama):
    assert not dist.is_initialized()
    tp = fxtp.compile(llama, 2)
    with pytest.raises(RuntimeError, match="torchrun") as info:
        tp.module(0)
    assert "init_process_group" in str(info.value)


def test_process_group_of_the_wrong_size():
    with pytest.raises(RankFailure, match=r"process group has 2 ranks but the program was compiled for "
                                          r"world_size=4") as info:
        run_ranks(module_or_raise, 2, 4)
    assert "Traceback" in str(info.value)  # the rank's own traceback reaches the parent


def test_run_ranks_checks_its_backend():
    with pytest.raises(ValueError, match="'gloo' or 'nccl'"):
        run_ranks(module_or_raise, 2, 2, backend="mpi")
    if torch.cuda.device_count() < 2:
        with pytest.raises(RuntimeError, match="needs 2 GPUs"):
            run_ranks(module_or_raise, 2, 2, backend="nccl")


@pytest.mark.slow  # CI runs `fxtp demo` itself, as the README's first command
def test_demo_passes_on_real_processes():
    done = subprocess.run([sys.executable, "-m", "fxtp.cli", "demo"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout
    assert "column-parallel" in done.stdout and "all_reduce" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["dump", "no-such-arch", "--world-size", "2"], "no tiny config"),
    (["dump", "missing/config.json", "--world-size", "2"], "no such file"),
    (["dump", "llama", "--world-size", "64"], "attention heads"),
    (["demo", "--arch", "no-such-arch"], "no tiny config"),
])
def test_cli_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_dump_from_a_config_directory(tmp_path, capsys):
    tiny_config("llama").save_pretrained(tmp_path)
    assert main(["dump", str(tmp_path), "--world-size", "2", "--rank", "1"]) == 0
    assert capsys.readouterr().out.strip()
