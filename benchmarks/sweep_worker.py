"""A process that measures one model type after another for benchmarks/sweep_model_types.py.

Importing torch, transformers and fxtp takes about as long as measuring a tiny model, so one
process serves many types; a type that crashes it or runs past its timeout costs that type's row
only: the process is killed and the next type gets a fresh one. The child's protocol: one model
type a line on stdin; for each, ROW lines (its row so far, JSON) and a DONE line on stdout.
"""
from __future__ import annotations

import datetime
import json
import queue
import subprocess
import tempfile
import threading
import time
from typing import Optional

ROW = "ROW "
DONE = "DONE"
MESSAGE_CHARS = 160
MEMORY_LIMIT = 12 << 30  # bytes of address space a worker may map: a tiny model's measurement maps about 2 GiB, a worker grows over its types


def row_from_output(model_type: str, rows: list[dict], finished: bool, failure: str, world_sizes) -> dict:
    """The type's row from what its process printed: the last row, with the world sizes it did not
    reach marked as errors saying why (`failure`: it timed out, or exited)."""
    if not rows:
        return {"model_type": model_type, "run_on": datetime.date.today().isoformat(),
                "build_failure": f"process: {failure}", "sizes": {}}
    row = rows[-1]
    if not finished:
        for ws in world_sizes:
            row["sizes"].setdefault(str(ws), {"result": "error", "detail": f"process: {failure}"})
    return row


class Worker:
    """The child process (`command`), started on first use and again after a failure."""

    def __init__(self, command: list[str]):
        self.command = command
        self.process: Optional[subprocess.Popen] = None
        self.lines: queue.Queue = queue.Queue()
        self.stderr = tempfile.TemporaryFile(mode="w+")  # fxtp's stage timings go there; read back on a crash

    def _start(self) -> None:
        self.stderr.seek(0)
        self.stderr.truncate()
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, bufsize=1)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True).start()

    @staticmethod
    def _read(stdout, lines: queue.Queue) -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)  # the process closed its stdout: it exited

    def _stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process = None

    def _last_error(self) -> str:
        self.stderr.seek(0)
        tail = self.stderr.read().strip().splitlines()[-1:]
        return " ".join(tail)[:MESSAGE_CHARS]

    def measure(self, model_type: str, timeout: float, world_sizes) -> dict:
        if self.process is None:
            self._start()
        start = time.monotonic()
        self.process.stdin.write(model_type + "\n")
        self.process.stdin.flush()
        rows, failure = [], ""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, start + timeout - time.monotonic()))
            except queue.Empty:
                failure = f"timed out after {timeout} s"
                self._stop()
                break
            if line is None:
                self.process.wait()
                failure = f"exited with {self.process.returncode}: {self._last_error()}"
                self.process = None
                break
            if line.startswith(ROW):
                rows.append(json.loads(line[len(ROW):]))
            elif line == f"{DONE} {model_type}":
                break
        row = row_from_output(model_type, rows, not failure, failure, world_sizes)
        row["seconds"] = round(time.monotonic() - start, 1)
        return row

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
        self.stderr.close()


def serve(measure) -> None:
    """The child's loop: measure(model_type, emit) for each line of stdin, its rows on stdout. Its
    address space is capped: a type whose shrunk config still allocates gigabytes fails alone (an
    allocation error in its row) instead of waking the kernel's OOM killer, which may pick any
    process of the machine."""
    import resource
    import sys

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    def emit(row: dict) -> None:
        print(ROW + json.dumps(row), flush=True)

    for line in sys.stdin:
        model_type = line.strip()
        emit(measure(model_type, emit))
        print(f"{DONE} {model_type}", flush=True)
