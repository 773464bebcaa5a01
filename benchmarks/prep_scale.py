"""Data preparation at scale: peak memory against the manifest's size, parts against one process, start-up cost.

    .venv/bin/python benchmarks/prep_scale.py [--lines 20000 200000] [--parts-lines 20000] [--json FILE]

On synthetic text manifests (one conversation a line, a user and an assistant turn of 12 words each), every build
runs as its own `omni-prep build` process with one worker, its process tree's resident memory sampled every 20 ms:
- memory: peak RSS (the build's parent process, and the tree) for each of `--lines`; the goal is that it does not
  grow with the manifest (issue 18: under 15 MB between 20,000 and 200,000 lines);
- parts: the same `--parts-lines` manifest as 1 part (one process, one worker) and as 2 parts (`launcher=local
  launcher.array=2`, one worker each, then the merge), wall time and the speedup;
- start-up: samples/s of builds of 200 and 1,000 lines; their ratio says how much of a small build is start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import REPO, add_json_option, write_figures

WORDS = ("apple river stone cloud music garden silver window yellow forest candle market bridge planet winter "
         "summer orange ticket rocket pencil").split()


def manifest(path: Path, lines: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(lines):
            turns = [" ".join(rng.choices(WORDS, k=12)) for _ in range(2)]
            f.write(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": turns[0]},
                                                            {"role": "assistant", "content": turns[1]}]}) + "\n")
    return path


def run(args: list[str]) -> dict:
    """One `omni-prep` command: wall seconds and peak RSS (MB) of its parent process and of its whole tree."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    root, parent_peak, tree_peak = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = [p.memory_info().rss for p in tree]
            parent_peak, tree_peak = max(parent_peak, rss[0]), max(tree_peak, sum(rss))
        except psutil.Error:
            pass
        time.sleep(0.02)
    err = proc.stderr.read()
    if proc.returncode != 0:
        sys.exit(f"prep_scale: omni-prep {' '.join(args)} failed:\n{err[-2000:]}")
    return {"seconds": round(time.perf_counter() - started, 2), "parent_peak_mb": round(parent_peak / 2**20, 1),
            "tree_peak_mb": round(tree_peak / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, nargs=2, default=(20_000, 200_000))
    parser.add_argument("--parts-lines", type=int, default=20_000)
    add_json_option(parser)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prep-scale-"))
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    try:
        memory = {}
        for lines in args.lines:
            m = manifest(root / f"m{lines}.jsonl", lines)
            memory[lines] = {**run(["build", str(m), str(root / f"o{lines}"), "workers=1", "--no-progress"]),
                             "samples_per_s": 0.0}
            memory[lines]["samples_per_s"] = round(lines / memory[lines]["seconds"], 1)
        small, large = args.lines
        report["memory"] = {str(k): v for k, v in memory.items()}
        report["memory_growth_mb"] = {k: round(memory[large][k] - memory[small][k], 1)
                                      for k in ("parent_peak_mb", "tree_peak_mb")}

        m = manifest(root / "parts.jsonl", args.parts_lines)
        one = run(["build", str(m), str(root / "one"), "workers=1", "--no-progress"])
        two = run(["build", str(m), str(root / "two"), "workers=1", "launcher=local", "launcher.array=2"])
        report["parts"] = {"lines": args.parts_lines, "one_part_s": one["seconds"], "two_parts_s": two["seconds"],
                           "speedup_2_vs_1": round(one["seconds"] / two["seconds"], 2)}

        startup = {}
        for lines in (200, 1000):
            m = manifest(root / f"s{lines}.jsonl", lines)
            startup[lines] = round(lines / run(["build", str(m), str(root / f"s{lines}"), "workers=1",
                                                "--no-progress"])["seconds"], 1)
        report["startup"] = {"samples_per_s_200": startup[200], "samples_per_s_1000": startup[1000],
                             "ratio_1000_vs_200": round(startup[1000] / startup[200], 2)}
    finally:
        shutil.rmtree(root)
    print(json.dumps(report, indent=2))
    write_figures(args.json, "prep_scale", report)


if __name__ == "__main__":
    main()
