"""A rank whose step fails takes its peers down with it, within seconds, naming itself.

Without this, a rank that raises while its process stays alive leaves every peer blocked in its next
collective until the process group's timeout (30 minutes by default for gloo). A failing rank
therefore, before it re-raises:
1. writes "rank R: <error>" under a key of its group into the process group's store, then
2. tears its process group down, which closes its connections: a peer blocked in a collective gets an
   error at once (gloo: "Connection closed by peer"; NCCL aborts its communicators).
A peer whose step then fails finds the key and raises `PeerFailure` naming the failing rank, chained to
the collective's own error. After a failure the group is gone on every rank that saw it: the ranks'
states have diverged, so no later collective could be trusted; create a new group to go on.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch.distributed as dist

from fxtp.runtime.rank_agreement import RanksDisagree
from fxtp.sharding.collectives import process_group_named

class PeerFailure(RuntimeError):
    """Another rank's step failed; this rank's collective was cut off by it."""


def _note_key(group_name: str) -> str:
    return f"fxtp/failed/{group_name}"


def _store() -> Optional[dist.Store]:
    """The default group's store, which every group of the job shares (a private torch accessor, stable
    since torch 1.x; None where it is missing)."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except (RuntimeError, ValueError):
        return None


def _group(group_name: str) -> Optional[dist.ProcessGroup]:
    try:
        return process_group_named(group_name)
    except (RuntimeError, ValueError, KeyError):
        return None


def _failed_peer(store: Optional[dist.Store], group_name: str, rank: int) -> Optional[str]:
    """The note of another rank of the group that failed first, if one was written. A failing rank writes
    it before it closes its connections, so a peer cut off by it finds it without waiting."""
    key = _note_key(group_name)
    try:
        if store is None or not store.check([key]):
            return None
        note = store.get(key).decode()
    except (RuntimeError, OSError):  # the store is gone too
        return None
    return None if note.startswith(f"rank {rank}:") else note


_KEPT: list = []  # the stores of groups this process tore down: a store served by this rank stays up for the peers


@contextlib.contextmanager
def failing_fast(group_name: str, rank: int):
    """Run a step of `rank` on the group `group_name`: if it raises, tell the peers and tear the group
    down (above); if a peer failed first, raise PeerFailure naming it."""
    try:
        yield
    except RanksDisagree:  # raised on every rank alike: no peer is left waiting, and the group stays usable
        raise
    except Exception as error:
        if not (dist.is_available() and dist.is_initialized()) or _group(group_name) is None:
            raise
        store = _store()
        peer = _failed_peer(store, group_name, rank)
        if peer is None:
            if store is not None:
                store.set(_note_key(group_name), f"rank {rank}: {type(error).__name__}: {error}"[:2000])
                _KEPT.append(store)
            _tear_down(group_name)
            raise
        _tear_down(group_name)
        raise PeerFailure(f"{peer}\n(rank {rank} stopped because that rank failed; its process group is closed on "
                          "every rank: create a new one to go on)") from error


def _tear_down(group_name: str) -> None:
    group = _group(group_name)
    if group is None:
        return
    try:
        dist.destroy_process_group(None if group is dist.group.WORLD else group)
    except (RuntimeError, ValueError):  # already gone
        pass
