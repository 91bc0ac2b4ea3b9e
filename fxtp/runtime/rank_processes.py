"""Run a function on N real processes joined by a process group (tests, the demo): gloo on the CPU,
or NCCL with rank r on GPU r.

    def work(rank, x):            # module-level, so spawned processes can import it
        return x * dist.get_world_size()

    run_ranks(work, 2, 21)        # -> [42, 42], one result per rank, in rank order

Each rank is a fresh `spawn` process with one torch thread, so N ranks share a small machine
without oversubscribing it. A rank's exception comes back to the parent as `RankFailure`, with
the rank's traceback text; nothing waits forever: a rank that hangs, or a group that never
forms, ends the run with `TimeoutError` after `timeout` seconds.
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks", "free_port", "RankFailure"]


class RankFailure(RuntimeError):
    """A rank raised; the message holds its traceback."""

    def __init__(self, rank: int, remote_traceback: str):
        super().__init__(f"rank {rank} failed:\n{remote_traceback.rstrip()}")
        self.rank = rank
        self.remote_traceback = remote_traceback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, timeout: float, backend: str, results, fn: Callable,
               args: tuple) -> None:
    """Body of one spawned process: join the group, run fn, report (rank, ok, payload)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        # plain pickle: the default multiprocessing pickler would pass tensors as shared memory,
        # which breaks when this process exits before the parent has read them
        report = (rank, True, pickle.dumps(fn(rank, *args)))
    except BaseException:  # noqa: B902 - anything a rank raises must reach the parent
        report = (rank, False, traceback.format_exc())
    # report before leaving the group: leaving can make the other ranks fail with "connection
    # closed", and the parent should see this rank's own error first
    results.put(report)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0, backend: str = "gloo") -> list:
    """Run `fn(rank, *args)` on `world_size` new processes joined by a default group of `backend`
    ("gloo", or "nccl" with rank r on GPU r) and return the results in rank order.

    `fn`, `args` and the results must be picklable, and `fn` importable by module name (a
    module-level function). Raises `RankFailure` when a rank raises or dies, and
    `TimeoutError` when the ranks are not all done within `timeout` seconds; either way every
    rank still running is terminated.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"NCCL with {world_size} ranks needs {world_size} GPUs, this machine has "
                           f"{torch.cuda.device_count()}: use backend='gloo' on the CPU")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, timeout, backend, results, fn, args),
                         name=f"fxtp-rank{rank}", daemon=True) for rank in range(world_size)]
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.start()
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                _check_progress(procs, outputs, deadline, timeout)
                continue
            if not ok:
                raise RankFailure(rank, payload + _crashed_note(procs, rank))
            outputs[rank] = pickle.loads(payload)
    except BaseException:
        _stop(procs, grace=0.0)  # the others may be blocked in a collective with the failed rank
        raise
    _stop(procs, grace=10.0)
    return [outputs[rank] for rank in range(world_size)]


def _check_progress(procs, outputs: dict, deadline: float, timeout: float) -> None:
    """Raise if a rank died without reporting, or if time is up."""
    for rank, p in enumerate(procs):
        # _rank_main reports before it returns, so only a crash ends a rank early with a code != 0
        if rank not in outputs and p.exitcode not in (None, 0):
            raise RankFailure(rank, f"process exited with code {p.exitcode} without a result: it was killed "
                                    "(e.g. out of memory), crashed in native code, or could not import the "
                                    "function (see its stderr; fn must be a module-level function)")
    if time.monotonic() > deadline:
        missing = [r for r in range(len(procs)) if r not in outputs]
        raise TimeoutError(f"ranks {missing} did not finish within {timeout:g} s; pass a larger timeout= "
                           "if the work is slow, or look for a rank that skips a collective")


def _crashed_note(procs, failed: int) -> str:
    """Which other ranks already died: a rank's "connection reset" error often means another crashed."""
    crashed = [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(procs)
               if r != failed and p.exitcode not in (None, 0)]
    return f"\n(meanwhile {', '.join(crashed)})" if crashed else ""


def _stop(procs, grace: float) -> None:
    """Give ranks `grace` seconds to exit, then terminate (and if need be kill) the rest."""
    end = time.monotonic() + grace
    procs = [p for p in procs if p.pid is not None]  # started ones only
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
