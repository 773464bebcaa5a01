"""What several benchmarks share: the sample corpus, prepared into shards on the spot unless given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sample_corpus(root: Path, *build_overrides: str) -> tuple[Path, Path]:
    """Write the sample corpus under `root` and build it into shards: (manifest, shard directory)."""
    from data_prep.build import build
    from data_prep.config import from_overrides
    from data_prep.sample import write_sample_corpus

    manifest = write_sample_corpus(root / "corpus")
    build(str(manifest), str(root / "shards"), from_overrides(list(build_overrides)), progress=False)
    return manifest, root / "shards"


def sample_shards(shards: Path | None, root: Path) -> Path:
    """`shards` when given, else the sample corpus built under `root`."""
    return shards if shards is not None else sample_corpus(root)[1]


def run_workers(script: str, worker_args: list[str], out: Path, processes: int = 2) -> dict:
    """Run `script --worker WORKER_ARGS --out OUT` as `processes` ranks under torchrun; return OUT's JSON (written
    by rank 0). A failed run stops the benchmark with the ranks' last output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(Path(script).resolve()), "--worker", *worker_args, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{Path(script).stem}: run failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())
