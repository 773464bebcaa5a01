"""SLURM batch scripts and their submission, for every command that submits jobs (`omni-launch launcher=slurm`,
`omni-prep build ... launcher=slurm`).

Owns `SlurmConfig` (the sbatch options, `launcher.slurm` of both commands' configs), the `#SBATCH` header it asks
for, and `submit`: sbatch on a written script, the job id back, and a refusal (nothing submitted) as one
ConfigError line, never as "submitted". Base layer: imports nothing of the project but errors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omni_train.errors import ConfigError


@dataclass
class SlurmConfig:
    # sbatch --partition (null: the cluster's default).
    partition: Optional[str] = None
    # sbatch --account (null: the user's default).
    account: Optional[str] = None
    # sbatch --time: the job's wall-clock limit.
    time: str = "01:00:00"
    # GPUs per node to request (0: none, e.g. a CPU cluster); nproc_per_node processes run on each node.
    gpus_per_node: int = 0
    # sbatch --cpus-per-task: CPUs for a node's torchrun and its ranks.
    cpus_per_task: int = 2
    # sbatch --job-name (%x in output).
    job_name: str = "omni-train"
    # Where sbatch writes each job's log (%x job name, %j job id); relative paths are under run_dir (omni-prep:
    # under its output directory).
    output: str = "logs/%x-%j.out"
    # Extra `#SBATCH` lines, verbatim (e.g. "--exclusive", "--qos=high").
    extra: list[str] = field(default_factory=list)


def header(sl, nodes: int, output: str, extra: list[str] = ()) -> list[str]:
    """The script's first lines: the shebang and the `#SBATCH` options of `sl` (a SlurmConfig), for a job of
    `nodes` nodes whose log goes to `output`; `extra` options (e.g. --array) come before the user's own."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={sl.job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={sl.cpus_per_task}",
             f"#SBATCH --time={sl.time}", f"#SBATCH --output={output}", f"#SBATCH --chdir={os.getcwd()}"]
    lines += [f"#SBATCH --gpus-per-node={sl.gpus_per_node}"] if sl.gpus_per_node else []
    lines += [f"#SBATCH --partition={sl.partition}"] if sl.partition else []
    lines += [f"#SBATCH --account={sl.account}"] if sl.account else []
    lines += [f"#SBATCH {line}" for line in [*extra, *sl.extra]]
    return lines


def submit(script: Path, args: list[str] = ()) -> tuple[str, int, str]:
    """sbatch `script` with `args` (e.g. --wait, --dependency=...): (job id, sbatch's exit status, its message).
    With --wait the status is the job's. A script sbatch refuses is a ConfigError naming its reason."""
    if shutil.which("sbatch") is None:
        raise ConfigError("launcher=slurm needs sbatch on PATH: run this on a SLURM login node (or use --dry-run to "
                          "print the script)")
    done = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True)
    job = done.stdout.strip().split(";")[0]
    if not job:  # nothing was submitted
        raise ConfigError(f"sbatch did not submit {script} (exit {done.returncode}): "
                          f"{' '.join(done.stderr.split()) or 'no message'}")
    return job, done.returncode, " ".join(done.stderr.split())[-300:]
