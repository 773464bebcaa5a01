"""Multirun (`-m`): one job per combination of a sweep's values, each job in its own processes.

Owns expanding the overrides into jobs (Hydra's own sweep grammar: `trainer.lr=1e-3,3e-3`, `range(3)`, `choice`,
config groups such as `stage=sft,stage2_multimodal`, by Hydra's `BasicSweeper.split_arguments`), checking every
job's config before the first starts, and running them one after another. Job N runs in `RUN_DIR/N` (RUN_DIR as
composed from the overrides without the swept keys), with a fresh OS process group and torch process group: its
own `omni-launch` (or `omni-train`) process, killed with its children if the sweep is interrupted.
`RUN_DIR/multirun.json` records each job's overrides, run directory and exit status as they end (atomically).
Every job runs even when one fails; the sweep ends with the first failing job's exit status.

Hydra's own multirun cannot do this: its jobs run in one process, and the second job finds the first job's
DeepSpeed groups and torch.distributed state ("Group ... is not registered").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from omni_train.config.compose import compose
from omni_train.config.validate import validate
from omni_train.errors import ConfigError

MULTIRUN = ("-m", "--multirun")


def jobs(overrides: list[str]) -> tuple[str, list[list[str]]]:
    """RUN_DIR of the sweep and each job's overrides (its `run_dir` included), in Hydra's order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(" ".join(str(e).split())) from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    if any(o.key_or_group == "run_dir" and o.is_sweep_override() for o in parsed):
        raise ConfigError("run_dir cannot be swept: job N of a multirun runs in RUN_DIR/N")
    base = compose(fixed).run_dir
    combos = [combo for batch in BasicSweeper.split_arguments(parsed, None) for combo in batch]
    out = []
    for n, combo in enumerate(combos):
        job = [o for o in combo if not o.startswith("run_dir=")] + [f"run_dir={os.path.join(base, str(n))}"]
        try:
            validate(compose(job))
        except ConfigError as e:
            raise ConfigError(f"multirun job {n} ({' '.join(combo)}): {e}") from None
        out.append(job)
    return base, out


def multirun(prog: str, job_command: list[str], flags: list[str], overrides: list[str]) -> int:
    """Run each job as `job_command + flags + its overrides`, one after another; the first failing status."""
    base, sweep = jobs(overrides)
    # SIGTERM (scancel, kill) ends the sweep through the same path as Ctrl-C: the running job's group goes too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    record = Path(base) / "multirun.json"
    done: list[dict] = []
    print(f"{prog}: multirun of {len(sweep)} job(s) in {base}/N", file=sys.stderr)
    for n, job in enumerate(sweep):
        print(f"{prog}: job {n}: {' '.join(job)}", file=sys.stderr, flush=True)
        status = _run_alone([*job_command, *flags, *job])
        done.append({"job": n, "overrides": job[:-1], "run_dir": job[-1].split("=", 1)[1], "exit": status})
        if "--dry-run" not in flags:
            from omni_train.files import write_text_atomic

            record.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(record, json.dumps({"jobs": done}, indent=1) + "\n")
    failed = [d for d in done if d["exit"] != 0]
    print(f"{prog}: multirun: {len(done) - len(failed)} of {len(done)} job(s) succeeded"
          + (f"; failed: {', '.join(str(d['job']) + ' (exit ' + str(d['exit']) + ')' for d in failed)}"
             if failed else ""), file=sys.stderr)
    return failed[0]["exit"] if failed else 0


def _run_alone(cmd: list[str]) -> int:
    """The job in its own session (process group): an interrupted sweep takes the whole job down with it."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        _kill(proc)
        raise


def _kill(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
