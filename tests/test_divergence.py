"""A diverging run stops clean (real processes, the real ZeRO-3 engine): a step with a non-finite loss on any rank
is skipped on every rank with weights, optimizer state and learning rate untouched; `trainer.max_nonfinite_steps`
such steps in a row stop the run with one line and exit code 4, the summary says so, no checkpoint or export holds
non-finite weights, and `resume=auto` will not repeat it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch

from tests.conftest import REPO, data_args, run_launch


def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(sample_shards, tmp_path):
    """NaN features on one rank: the loss is NaN there alone, and both ranks skip the step."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.helpers.nonfinite_step", "--shards", str(sample_shards), "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["refused"] == [True, True], "a non-finite weight on one rank stops the save on both"
        first, skipped, after = result["steps"]
        assert first["applied"] and not first["unchanged"] and math.isfinite(first["loss"])
        assert first["moments"] > 0, "AdamW holds moments after the first step: the check below compares them"
        assert not skipped["applied"] and skipped["loss"] is not None and not math.isfinite(skipped["loss"])
        assert skipped["unchanged"], f"rank {rank}: the skipped step changed weights or optimizer state"
        assert after["applied"] and not after["unchanged"] and math.isfinite(after["loss"])
        assert skipped["lr"] != first["lr"] and after["lr"] == skipped["lr"], "the schedule stands still on a skip"


def test_a_diverging_run_stops_with_one_line_and_leaves_finite_weights(text_shards, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", *data_args(text_shards), "trainer.max_steps=12", "trainer.save_every=1",
            "trainer.keep_last=1", "trainer.warmup_steps=0", "trainer.max_nonfinite_steps=2", "launcher.max_restarts=1"]
    result = run_launch(*args, "trainer.lr=1e30")
    assert result.returncode == 4, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "the run diverged" in errors[0] and "trainer.max_nonfinite_steps=2" in errors[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bad = [r["step"] for r in records if r.get("loss") is None]
    assert bad and all(r["skipped"] == (r.get("loss") is None) for r in records), records
    assert records[-1]["step"] == bad[0] + 1, "the run stops at the second non-finite step in a row"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ended"] == "diverged" and summary["nonfinite_steps"] == 2 and summary["export"] is None
    assert summary["last_finite_step"] == bad[0] - 1 and not (run_dir / "export").exists()
    newest = sorted((run_dir / "checkpoints").glob("step_*/COMPLETE"))[-1].parent
    weights = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=newest.name)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(float(w.detach().abs().max()) for w in weights.values()) > 1e20, "the weights did blow up (finite, huge)"

    again = run_launch(*args, "resume=auto", "trainer.lr=1e30")
    assert again.returncode == 4 and again.stderr.count("error:") == 1 and "resume=auto would repeat" in again.stderr
    assert "Traceback" not in again.stderr
