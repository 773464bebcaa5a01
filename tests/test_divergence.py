"""A diverging run stops clean (a real run through omni-launch): `trainer.max_nonfinite_steps` skipped steps in a
row stop it with one line and exit code 4, the summary says so, no checkpoint or export holds non-finite weights,
torchrun does not restart it, and `resume=auto` will not repeat it. (That a non-finite loss on one rank skips the
step on every rank with weights, moments and schedule untouched is tests/test_zero3_training.py's.)"""

from __future__ import annotations

import json

import torch

from tests.conftest import data_args, run_launch


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
