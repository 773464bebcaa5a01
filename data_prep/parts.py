"""A build in N parts: run them (here, or as a SLURM job array) and merge them into one shard set.

Owns:
- `merge(out_dir)`: checks that OUT_DIR/part-I-of-N/ holds all N parts, each finished (its index.json) with the
  same source, tokenizer and settings, and writes OUT_DIR/index.json (the parts' shards, as paths under OUT_DIR,
  in part order; totals, per-modality statistics, reject reasons), rejects.jsonl and stats.txt. The loader reads
  the merged directory as it reads one build. A part that is missing or unfinished is named in one line.
- `run_parts(source, out_dir, cfg, overrides)`: `launcher=local` runs the N parts as processes on this machine
  (`launcher.array` of them, `workers` encoding processes each) and merges; `launcher=slurm` writes
  OUT_DIR/prep.sbatch (a job array, task I building part I) and OUT_DIR/merge.sbatch, submits the array and the
  merge after it (`--dependency=afterany`: the merge runs whatever the tasks' ends and names a part that failed).
  A failed task is resubmitted alone (`sbatch --array=I OUT_DIR/prep.sbatch`) and resumes its part; then the merge
  again (`sbatch OUT_DIR/merge.sbatch`, or `omni-prep merge OUT_DIR`).

Each part is an ordinary build (data_prep/build.py, `part=I/N`): the records whose index in the source is I modulo
N, so the parts are balanced, disjoint and together the whole; each resumes on its own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from data_prep.build import PROGRESS, part_dir, write_index
from data_prep.config import PrepConfig
from omni_train import slurm
from omni_train.errors import ConfigError
from omni_train.files import write_text_atomic

_PART = re.compile(r"part-(\d+)-of-(\d+)")


def merge(out_dir: str | Path) -> dict:
    """OUT_DIR/index.json over the N finished parts in OUT_DIR; returns it."""
    out = Path(out_dir)
    found = {(int(m[1]), int(m[2])): p for p in sorted(out.glob("part-*-of-*")) if (m := _PART.fullmatch(p.name))}
    counts = {n for _, n in found}
    if not found:
        raise ConfigError(f"{out} holds no part-I-of-N directory: build the parts with omni-prep build SOURCE {out} "
                          "part=I/N (or launcher=local|slurm launcher.array=N)")
    if len(counts) > 1:
        raise ConfigError(f"{out} holds parts of builds in {sorted(counts)} parts: keep one build's parts")
    n = counts.pop()
    indexes = []
    for i in range(n):
        where = part_dir(out, i, n)
        if not where.is_dir():
            raise ConfigError(f"part {i} of {n} is missing ({where}): build it with omni-prep build SOURCE {out} "
                              f"part={i}/{n}")
        if not (where / "index.json").is_file():
            state = "unfinished (a re-run resumes it)" if (where / PROGRESS).is_file() else "not built"
            raise ConfigError(f"part {i} of {n} is {state} ({where}): run omni-prep build SOURCE {out} part={i}/{n}")
        indexes.append(json.loads((where / "index.json").read_text()))
    header = {k: v for k, v in indexes[0].items() if k in ("source", "tokenizer_hash", "config")}
    for i, index in enumerate(indexes):
        other = {k: index[k] for k in header}
        if other != header:
            differ = [k for k in header if other[k] != header[k]]
            raise ConfigError(f"part {i} of {n} was built with another {', '.join(differ)} than part 0: rebuild it "
                              "with the same source, tokenizer and settings")
    shards = [{**s, "name": f"{part_dir('', i, n)}/{s['name']}"} for i, index in enumerate(indexes)
              for s in index["shards"]]
    rejects = [json.loads(line) for i in range(n)
               for line in (part_dir(out, i, n) / "rejects.jsonl").read_text().splitlines() if line.strip()]
    merged = write_index(out, {**header, "parts": n}, shards, rejects)
    t = merged["totals"]
    print(f"omni-prep: merged {n} parts: {t['samples']} samples, {t['tokens']} tokens in {len(shards)} shards, "
          f"{sum(t['media_seconds'].values()) / 3600:.2f} media hours, {t['rejected']} rejected; modalities "
          f"{dict(sorted(t['modalities'].items()))} ({out / 'stats.txt'})", file=sys.stderr)
    return merged


def _part_command(source: str, out_dir: str, overrides: list[str], part: str) -> list[str]:
    own = [o for o in overrides if not o.startswith(("launcher", "part="))]
    return [sys.executable, "-m", "data_prep.cli", "build", str(Path(source).resolve()), str(Path(out_dir).resolve()),
            *own, f"part={part}", "--no-progress"]


def run_parts(source: str, out_dir: str, cfg: PrepConfig, overrides: list[str], tokenizer: str | None,
              dry_run: bool = False, wait: bool = False) -> int:
    """Run the `launcher.array` parts of a build as `launcher.name` says; the exit status."""
    la, n = cfg.launcher, cfg.launcher.array
    extra = [f"--tokenizer={tokenizer}"] if tokenizer else []
    if la.name == "local":
        commands = [[*_part_command(source, out_dir, overrides, f"{i}/{n}"), *extra] for i in range(n)]
        if dry_run:
            print("\n".join(shlex.join(c) for c in commands))
            return 0
        return _run_local(commands, out_dir)
    return _submit_array(source, out_dir, cfg, overrides, extra, dry_run, wait)


def _run_local(commands: list[list[str]], out_dir: str) -> int:
    started = time.perf_counter()
    procs = [subprocess.Popen(c) for c in commands]
    codes = [p.wait() for p in procs]
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
        print(f"omni-prep: part(s) {failed} of {len(codes)} failed (exit {[codes[i] for i in failed]}); the same "
              "command resumes them", file=sys.stderr)
        return codes[failed[0]]
    merge(out_dir)
    print(f"omni-prep: {len(codes)} parts in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _submit_array(source: str, out_dir: str, cfg: PrepConfig, overrides: list[str], extra: list[str],
                  dry_run: bool, wait: bool) -> int:
    la, n, out = cfg.launcher, cfg.launcher.array, Path(out_dir).resolve()
    sl = la.slurm
    log = sl.output if os.path.isabs(sl.output) else str(out / sl.output)
    part = _part_command(source, str(out), overrides, f"$SLURM_ARRAY_TASK_ID/{n}")
    quoted = " ".join(a if a.startswith("part=") else shlex.quote(a) for a in [*part, *extra])
    body = "\nset -euo pipefail\nexport OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}\n"
    array = "\n".join(slurm.header(sl, 1, log.replace("%j", "%A_%a"), [f"--array=0-{n - 1}"])) + body + \
        f'echo "omni-prep: part $SLURM_ARRAY_TASK_ID of {n} on $(hostname)"\n{quoted}\n'
    merging = "\n".join(slurm.header(sl, 1, log)) + body + \
        f"{shlex.join([sys.executable, '-m', 'data_prep.cli', 'merge', str(out)])}\n"
    if dry_run:
        print(array + "\n" + merging, end="")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (Path(log).parent).mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "prep.sbatch", array)
    write_text_atomic(out / "merge.sbatch", merging)
    job, _, _ = slurm.submit(out / "prep.sbatch")
    merge_job, status, message = slurm.submit(out / "merge.sbatch", [f"--dependency=afterany:{job}",
                                                                     *(["--wait"] if wait else [])])
    print(f"omni-prep: array job {job} ({n} tasks, {out / 'prep.sbatch'}) and merge job {merge_job} after it "
          f"submitted; logs: {log}", file=sys.stderr)
    if status != 0:
        print(f"omni-prep: merge job {merge_job} ended with exit {status} ({message}); resubmit a failed task with "
              f"sbatch --array=I {out / 'prep.sbatch'}, then sbatch {out / 'merge.sbatch'}", file=sys.stderr)
    return status
