"""A run continues on another number of processes: a checkpoint written by 2 ranks in the middle of an epoch is
resumed by 1 (real processes, the real ZeRO-3 engine). Weights, AdamW moments and step counts, and the learning
rate are those the 2 ranks restore themselves, bit for bit; the next step trains; the rest of the epoch is re-dealt
(its exactly-once delivery is tests/test_loader.py's)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO, run_launch


def _resume(out, ranks: int, *overrides: str) -> dict:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    done = subprocess.run([*launcher, "-m", "tests.helpers.reshard_resume", str(out), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_a_checkpoint_of_two_ranks_resumes_on_one(text_shards_many, tmp_path):
    data = [f"data.sources=[{{name:data,path:{text_shards_many}}}]", "data.max_len=256", "data.chunk_samples=48",
            "trainer.micro_batch_size=1", "trainer.warmup_steps=0", "trainer.max_steps=4", "trainer.lr=3e-3"]
    first = run_launch(f"run_dir={tmp_path / 'a'}", *data, "trainer.save_every=2", "trainer.keep_last=2")
    assert first.returncode == 0, first.stderr[-4000:]
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000002"
    same = _resume(tmp_path / "two.json", 2, f"run_dir={tmp_path / 'b2'}", f"resume={ckpt}", *data)
    one = _resume(tmp_path / "one.json", 1, f"run_dir={tmp_path / 'b1'}", f"resume={ckpt}", *data)
    assert same["world"] == 2 and one["world"] == 1 and one["start_step"] == same["start_step"] == 2
    assert same["adam_steps"] == [2] and one["adam_steps"] == [2]
    assert one["lr"] == same["lr"] and len(one["digests"]) == len(same["digests"]) > 0
    differ = [name for name in same["digests"] if one["digests"][name] != same["digests"][name]]
    assert not differ, f"weights or moments differ after resharding: {differ[:5]}"
    assert same["remainder_units"] == 0 and one["remainder_units"] > 0, "the 1-rank run reads the re-dealt epoch"
    assert math.isfinite(one["loss"]) and math.isfinite(same["loss"])
    assert (ckpt / "universal").is_dir(), "the universal copy is written once, beside the checkpoint"
