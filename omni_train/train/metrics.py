"""Metrics: `metrics.jsonl` in the run directory, wandb (offline unless configured), TensorBoard when asked
(`logging.tensorboard`), a rank-0 progress bar.

Owns: everything the loop reports. Only rank 0 writes or prints. On resume the lines past the restored step are
dropped (and TensorBoard's events past it purged), so the run reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from omni_train.config.compose import REDACTED
from omni_train.config.schema import LoggingConfig
from omni_train.files import json_safe, write_text_atomic

# Credentials by name: the whole key, or its last part after `_`, `-` or `.` (wandb_api_key, hf_token), never a word
# inside a model setting (token2wav_config, pad_token_id, num_key_value_heads).
SECRET_KEY = re.compile(r"^(?:.*[_.-])?(?:api_?key|token|secret|secret_key|password|passwd|private_key|credentials?)$",
                        re.IGNORECASE)


# RUN_DIR/train.log (conf/config.yaml's job_logging): the run's console lines and one line per step
RUN_LOG = logging.getLogger("omni_train.run")


def redact(obj):
    """Drop values of keys that look like credentials (a wandb key must never reach a log or a saved config)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class Metrics:
    def __init__(self, cfg: LoggingConfig, run_dir: str, rank: int, total_steps: int, start_step: int,
                 run_config: dict):
        self.active = rank == 0
        self.path, self.total_steps = Path(run_dir) / "metrics.jsonl", total_steps
        self.bar = self.wandb = self.tensorboard = None
        if not self.active:
            return
        self._truncate_after(start_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: readers drop the events a killed attempt wrote past the restored step
            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                             purge_step=start_step + 1 if start_step else None)
        if cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.wandb_project, dir=run_dir, mode=cfg.wandb_mode, config=redact(run_config),
                name=Path(run_dir).name, resume="allow", id=_wandb_id(run_dir),
            )
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        """One step's figures; a non-finite one is written as null and named under `nonfinite` (strict JSON)."""
        if not self.active:
            return
        bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
        with self.path.open("a") as f:
            f.write(json.dumps({**json_safe(record), **({"nonfinite": bad} if bad else {})}, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self._scalars(record["step"], record)
        RUN_LOG.info(f"step {record['step']}/{self.total_steps}: " + " ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k in ("loss", "lr", "grad_norm", "tokens_per_s")
            and isinstance(v, float)))
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.2e}"
            )

    def log_eval(self, step: int, record: dict) -> None:
        """An evaluation's metrics as their own line of metrics.jsonl (and to wandb), one console line."""
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe({"step": step, **record}), allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        self._scalars(step, record)
        self.info(f"step {step}: eval/loss {record['eval/loss']:.4f}")

    def _scalars(self, step: int, record: dict) -> None:
        if self.tensorboard is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def info(self, message: str) -> None:
        """One line on the console (above the progress bar), rank 0 only."""
        if not self.active:
            return
        RUN_LOG.info(message)
        if self.bar is not None:
            self.bar.write(f"omni-train: {message}", file=sys.stderr)
        else:
            print(f"omni-train: {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        self.info(f"warning: {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _wandb_id(run_dir: str) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]


def peak_memory_gb() -> float:
    """This process's peak memory so far: CUDA's max allocated on GPU, max resident set size on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
