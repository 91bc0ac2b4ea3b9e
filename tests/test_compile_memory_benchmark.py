"""benchmarks/compile_memory.py refusing too few --compiles to measure."""
import sys

import pytest

from benchmark_harness import benchmark_module, refusal


def test_compile_memory_refuses_too_few_compiles_to_measure(monkeypatch, capsys):
    """benchmarks/compile_memory.py reads RSS every 10 rounds from round 0: under 10 compiles it has one
    reading and no growth to divide, so it stops at its arguments; at 10 it goes on to build the model."""
    for compiles in ("0", "9"):
        assert "--compiles must be at least 10" in refusal("compile_memory", monkeypatch, capsys, "--compiles", compiles)

    class Started(Exception):
        pass

    def started(arch):
        raise Started(arch)

    compile_memory = benchmark_module(monkeypatch, "compile_memory")
    monkeypatch.setattr(compile_memory, "tiny_model", started)
    monkeypatch.setattr(sys, "argv", ["compile_memory.py", "--compiles", "10"])
    with pytest.raises(Started):
        compile_memory.main()
