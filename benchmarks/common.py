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
    threads = max(1, (os.cpu_count() or 1) // processes)  # the cores shared out, as torchrun would
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{Path(script).stem}: run failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def flatten(prefix: str, value) -> dict[str, float]:
    """A nested result as a flat {"prefix.key.subkey": number} map (non-numbers left out)."""
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}", sub))
        return out
    return {prefix: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def add_json_option(parser) -> None:
    parser.add_argument("--json", type=Path, help="also write the figures to this file, as a flat name -> number map")


def write_figures(path: Path | None, prefix: str, result: dict) -> None:
    """Write `result` flattened under `prefix` to `path` (when given), through a temporary name."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(flatten(prefix, result), indent=2, sort_keys=True))
    tmp.replace(path)
