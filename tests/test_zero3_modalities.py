"""No ZeRO-3 hang when ranks hold different modalities and clip counts: 2 processes under the real engine for 15
steps, each rank holding 2, 1 or 0 audio clips and images per micro-batch, out of phase with the other. transformers' own forward, which skips an
absent modality's encoder, is the control: it must fail (collective mismatch) or time out, never finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil

from tests.conftest import REPO


def _run(shards, out, objective, timeout):
    """Run the 2-rank job; returns its CompletedProcess, or None when it had to be killed at `timeout`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.helpers.zero3_modalities", "--shards", str(shards), "--out", str(out),
           "--objective", objective, "--timeout-min", "0.25" if objective == "transformers" else "1.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()
        proc.communicate()
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_ranks_with_different_modalities_train_to_the_end(sample_shards, tmp_path):
    result = _run(sample_shards, tmp_path / "ours", "ours", timeout=400)
    assert result is not None and result.returncode == 0, result and result.stderr[-4000:]
    for rank in (0, 1):
        losses = json.loads((tmp_path / "ours" / f"rank{rank}.json").read_text())["losses"]
        assert len(losses) == 15 and all(loss > 0 for loss in losses)


def test_control_transformers_forward_breaks_on_the_same_data(sample_shards, tmp_path):
    result = _run(sample_shards, tmp_path / "control", "transformers", timeout=240)
    finished = result is not None and result.returncode == 0
    assert not finished, "the control finished: the test data does not exercise a modality mismatch"
    assert not (tmp_path / "control" / "rank1.json").exists()
