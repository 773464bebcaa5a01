"""SLURM batch scripts and their submission, for every command that submits jobs (`omni-launch launcher=slurm`,
`omni-prep build ... launcher=slurm`).

Owns the `#SBATCH` header a `SlurmConfig` asks for and `submit`: sbatch on a written script, the job id back, and
a refusal (nothing submitted) as one ConfigError line, never as "submitted". Base layer: the config schema's
SlurmConfig is all it reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from omni_train.errors import ConfigError


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
