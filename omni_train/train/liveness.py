"""Liveness: which rank went silent when a collective fails.

Owns naming the lost peer. gloo and NCCL say that a peer closed its connection or stopped answering, not which
rank it was, and the dead node's own log dies with it. So every rank runs a daemon thread that bumps its counter
in the process group's store (MASTER_ADDR:MASTER_PORT) every `INTERVAL` seconds. A rank whose collective failed
says it is stopping; the first to say so surveys: it reads every counter twice, `WATCH` seconds apart (one
multi_get each), and the ranks whose counters stood still and that did not say they were stopping are the lost
ones. It posts the verdict for the other survivors, so a failure costs the store O(world) reads, not O(world^2);
rank 0, whose process hosts the store, stays until every survivor has read it.
When the store itself does not answer, the rank that hosts it (rank 0) is the one lost.

Keys live under a prefix drawn by rank 0 at start (broadcast once), so a store that outlives a restart (torchrun's
shared store) never hands a new attempt an old verdict; every rank's keys exist before start returns.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import timedelta

import torch

INTERVAL = 1.0
WATCH = 4.0
STORE_TIMEOUT_S = 5.0
# the longest a failing rank spends naming the lost one before it exits
SURVEY_DEADLINE_S = WATCH + 2 * STORE_TIMEOUT_S

_beat: _Heartbeat | None = None


def _store(prefix: str):
    """A client of the process group's store of our own (the process group's client belongs to its thread)."""
    client = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False)
    return torch.distributed.PrefixStore(prefix, client)


class _Heartbeat(threading.Thread):
    def __init__(self, rank: int, world: int, prefix: str):
        super().__init__(name="omni-train-liveness", daemon=True)
        self.rank, self.world, self.prefix, self.halt = rank, world, prefix, threading.Event()
        self.store = _store(prefix)
        self.store.set(f"host/{rank}", socket.gethostname())
        self.store.add(f"beat/{rank}", 0)

    def run(self) -> None:
        try:
            while not self.halt.wait(INTERVAL):
                self.store.add(f"beat/{self.rank}", 1)
        except (RuntimeError, ValueError):
            return  # the store is gone; lost_peers() says so


def start(rank: int, world: int) -> None:
    """Start this rank's heartbeat: collective (every rank calls it once the process group is up; nothing to watch
    in a group of one)."""
    global _beat
    if world == 1 or _beat is not None:
        return
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    session = torch.tensor([uuid.uuid4().int >> 65 if rank == 0 else 0], dtype=torch.int64, device=device)
    torch.distributed.broadcast(session, src=0)
    _beat = _Heartbeat(rank, world, f"omni-train/liveness/{session.item():x}/")
    torch.distributed.barrier()  # every rank's keys exist before anyone can survey them
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
    if _beat is None:
        return "no heartbeats to tell which rank (a group of one)"
    found: list[str] = []
    survey = threading.Thread(target=_survey, args=(_beat.prefix, rank, world, found), daemon=True)
    survey.start()
    survey.join(SURVEY_DEADLINE_S)
    if found:
        return found[0]
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return f"rank 0 (host of the store, {where}) stopped answering"


def _survey(prefix: str, rank: int, world: int, found: list[str]) -> None:
    """Put the phrase naming the silent ranks (surveyed here, or read from the surveyor's verdict) into `found`;
    leave it empty when the store cannot be reached. Rank 0, whose process hosts the store, then keeps it up until
    every survivor has read the verdict (or the caller's deadline passes): a survivor that exited at once would take
    the verdict with it, and the others would blame rank 0."""
    try:
        store = _store(prefix)
        store.set(f"stopping/{rank}", "1")
        if store.add("surveyor", 1) > 1:
            store.wait(["verdict"], timedelta(seconds=SURVEY_DEADLINE_S - STORE_TIMEOUT_S))
            verdict = store.get("verdict").decode()
        else:
            beats = [f"beat/{r}" for r in range(world)]
            first = store.multi_get(beats)
            time.sleep(WATCH)
            second = store.multi_get(beats)
            silent = [r for r in range(world)
                      if r != rank and first[r] == second[r] and not store.check([f"stopping/{r}"])]
            hosts = store.multi_get([f"host/{r}" for r in silent]) if silent else []
            verdict = (", ".join(f"rank {r} (host {h.decode()})" for r, h in zip(silent, hosts))
                       + " stopped answering" if silent else "every other rank still answers or is stopping too")
            store.set("survivors", str(world - len(silent)))  # before the verdict: whoever sees one sees both
            store.set("verdict", verdict)
        found.append(verdict)
        store.add("read", 1)
        while rank == 0 and store.add("read", 0) < int(store.get("survivors")):
            time.sleep(0.1)
    except (RuntimeError, ValueError):
        return
