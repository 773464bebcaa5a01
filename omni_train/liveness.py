"""Liveness: which rank went silent when a collective fails.

Owns naming the lost peer. gloo and NCCL say that a peer closed its connection or stopped answering, not which
rank it was, and the dead node's own log dies with it. So every rank runs a daemon thread that bumps its counter
in the process group's store (MASTER_ADDR:MASTER_PORT) every `INTERVAL` seconds. A rank whose collective failed
says it is stopping, then reads the counters twice, `WATCH` seconds apart: the ranks whose counters stood still
and that did not say they were stopping are the lost ones. When the store itself is unreachable, the rank that
hosts it (rank 0) is the one lost.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

import torch

INTERVAL = 1.0
WATCH = 4.0
STORE_TIMEOUT_S = 5.0
PREFIX = "omni-train/liveness/"

_beat: _Heartbeat | None = None


def _store():
    """A client of the process group's store of our own (the process group's client belongs to its thread)."""
    client = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False)
    return torch.distributed.PrefixStore(PREFIX, client)


class _Heartbeat(threading.Thread):
    def __init__(self, rank: int):
        super().__init__(name="omni-train-liveness", daemon=True)
        self.rank, self.halt = rank, threading.Event()

    def run(self) -> None:
        try:
            store = _store()
            store.set(f"host/{self.rank}", socket.gethostname())
            while not self.halt.wait(INTERVAL):
                store.add(f"beat/{self.rank}", 1)
        except (RuntimeError, ValueError):
            return  # the store is gone; lost_peers() says so


def start(rank: int, world: int) -> None:
    """Start this rank's heartbeat (after the process group is up; nothing to watch in a group of one)."""
    global _beat
    if world > 1 and _beat is None:
        _beat = _Heartbeat(rank)
        _beat.start()


def stop() -> None:
    global _beat
    if _beat is not None:
        _beat.halt.set()
        _beat.join(timeout=2 * INTERVAL)  # a beat blocked on a frozen store is left behind (a daemon thread)
        _beat = None


def lost_peers(rank: int, world: int) -> str:
    """Which peers stopped answering, as a phrase for the failure message (takes about WATCH seconds). The survey
    runs in a thread of its own with a deadline: a client of a store whose host is frozen or cut off waits forever,
    whatever its timeout says."""
    found: list[str] = []
    survey = threading.Thread(target=lambda: found.append(_survey(rank, world)), daemon=True)
    survey.start()
    survey.join(WATCH + 3 * STORE_TIMEOUT_S)
    if found and found[0]:
        return found[0]
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return f"rank 0 (host of the store, {where}) stopped answering"


def _survey(rank: int, world: int) -> str:
    """The phrase naming the silent ranks, or "" when the store cannot be reached."""
    try:
        store = _store()
        store.set(f"stopping/{rank}", "1")
        first = [store.add(f"beat/{r}", 0) for r in range(world)]
        time.sleep(WATCH)
        second = [store.add(f"beat/{r}", 0) for r in range(world)]
        silent = [r for r in range(world) if r != rank and first[r] == second[r]
                  and not store.check([f"stopping/{r}"])]
        hosts = {r: store.get(f"host/{r}").decode() if store.check([f"host/{r}"]) else "?" for r in silent}
    except (RuntimeError, ValueError):
        return ""
    if not silent:
        return "every other rank still answers or is stopping too"
    return ", ".join(f"rank {r} (host {hosts[r]})" for r in silent) + " stopped answering"
