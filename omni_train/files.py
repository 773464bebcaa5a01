"""Crash-safe file writes: a file is either absent, the old version, or the complete new one, also when it is written
as a stream; JSON is strict. Also a cheap fingerprint of a directory's files (what a LoRA checkpoint records of the
base it does not hold).

Base layer: imported by data_prep and every layer of omni_train; imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, shared: bool = False):
    """A text file open on a temporary sibling of `path`, renamed over `path` when the block ends without an error
    (removed otherwise). `shared`: other processes may write the same file at once (the last ranks of a job to
    finish), so the temporary's name holds the process id and each renames a whole file of its own (one killed
    mid-write leaves its temporary behind, where an unshared one is overwritten by the next write)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if shared else f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary sibling, then rename it over `path`."""
    with atomic_writer(path) as f:
        f.write(text)
    return Path(path)


def json_safe(obj):
    """`obj` with every non-finite float (NaN, +-inf: not JSON) as None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """Strict JSON (non-finite floats written as null), atomically."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False))


# A directory written by several processes (a training checkpoint) counts only once this file is in it: written
# last, after every writer has finished.
COMPLETE = "COMPLETE"


def is_complete(directory: str | os.PathLike) -> bool:
    return (Path(directory) / COMPLETE).is_file()


def fingerprint(directory: str | os.PathLike, samples: int = 33, block: int = 4096) -> str:
    """A cheap digest of the files directly in `directory` (sub-directories left out): each file's name, size and
    `samples` blocks of `block` bytes spread evenly from its start to its end. Any rewrite of trained weights
    changes it; a copy to another place does not. Reads about 135 KB per file, whatever its size."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - block) * i // max(1, samples - 1)))
                digest.update(f.read(block))
    return digest.hexdigest()[:32]
