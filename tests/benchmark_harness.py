"""What the tests of benchmarks/ share: the scripts' folder, importing a script's module as the
scripts import each other (benchmarks/ on the path), and running a script as a user does: under
torchrun on two gloo processes, or its main() stopping at its arguments."""
import importlib
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def benchmark_module(monkeypatch, name: str):
    """benchmarks/`name`.py as a module, with benchmarks/ on the path for this test: the scripts
    import their sibling modules (peers.py, kernel_timing.py, ...) from beside them."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    return importlib.import_module(name)


def on_two_cpu_processes(tmp_path, script: str, *arguments: str) -> str:
    """benchmarks/`script` under torchrun on 2 gloo processes (`--device cpu`): its stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(BENCHMARKS, script), "--device", "cpu", *arguments]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def refusal(script: str, monkeypatch, capsys, *arguments: str) -> str:
    """benchmarks/`script`.py's main() as the command line `script.py arguments` runs it (benchmarks/ on the
    path), in this process: it must stop at its arguments (argparse's exit status 2). What it printed to stderr."""
    main = benchmark_module(monkeypatch, script).main
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *arguments])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    return capsys.readouterr().err
