"""Progress of a long piece of work with a known size, on rank 0's console: the export's bytes, a checkpoint's
weights loading.

Owns `Progress`: at most one line every `every` seconds (none for work that ends sooner), each with the share done
and an estimate of the time left at the rate so far, then one closing line. Base layer: imports nothing of the
project but `dist`.
"""

from __future__ import annotations

import sys
import time

from omni_train import dist


class Progress:
    def __init__(self, what: str, total_bytes: int, every: float = 30.0):
        self.what, self.total, self.every = what, max(total_bytes, 1), every
        self.done, self.started = 0, time.perf_counter()
        self.last = self.started
        self.spoke = False

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last < self.every or dist.rank() != 0:
            return
        elapsed, share = now - self.started, min(self.done / self.total, 1.0)
        left = elapsed * (1 - share) / share if share > 0 else float("nan")
        print(f"omni-train: {self.what}: {self.done / 2**30:.1f} of {self.total / 2**30:.1f} GB ({share:.0%}), "
              f"{elapsed:.0f} s so far, about {left:.0f} s left", file=sys.stderr, flush=True)
        self.last, self.spoke = now, True

    def close(self) -> None:
        if self.spoke and dist.rank() == 0:
            print(f"omni-train: {self.what}: {self.done / 2**30:.1f} GB in {time.perf_counter() - self.started:.0f} s",
                  file=sys.stderr, flush=True)
