"""The spine end to end: 2 processes on gloo under the real DeepSpeed ZeRO-3 engine, the real tiny Qwen2.5-Omni
Thinker and the real tokenizer; training, sharding, kill + resume, and export to a transformers checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, data_args, kill_job_when, run_launch, start_launch

STEPS = 30
NEW_LR = 1e-4  # the peak learning rate a resume sets over the checkpoint's 3e-3


def _args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    # Held out: the same shards, two micro-batches per rank, every 10 steps; the best checkpoint is kept.
    return [f"run_dir={run_dir}", *data_args(shards), f"trainer.max_steps={STEPS}", "trainer.save_every=10",
            "trainer.keep_last=1", "trainer.lr=3e-3", f"eval.sources=[{{name:held,path:{shards}}}]",
            "eval.max_batches=2", "trainer.eval_every=10", "trainer.keep_best=true", *extra]


def _records(run_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if key in r]
    assert len(steps) == len(set(steps)), f"a step's {key} is logged twice: {steps}"
    return {r["step"]: r[key] for r in records if key in r}


def _losses(run_dir: Path) -> dict[int, float]:
    return _records(run_dir, "loss")


@pytest.fixture(scope="module")
def reference(text_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_launch(*_args(run_dir, text_shards))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_loss_falls_over_30_steps(reference):
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 1.0, (first, last)


def test_the_run_log_holds_the_stage_line_and_every_step(reference):
    import re

    log = (reference / "train.log").read_text()
    assert re.search(r"\[rank 0\]\[INFO\] stage sft: [\d,]+ of [\d,]+ parameters train", log), log[:2000]
    steps = [int(s) for s in re.findall(r"\[rank 0\]\[INFO\] step (\d+)/30: loss ", log)]
    assert steps == list(range(1, STEPS + 1)), steps


def test_each_rank_holds_half_of_the_parameters(reference):
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert 0.5 < summary["packing_efficiency"] <= 1.0 and summary["mixture"] == {"data": 1.0}
    total = summary["total_params"]
    for local in summary["local_params_per_rank"]:
        assert abs(local - total / 2) < 0.01 * total, (local, total)


def test_export_loads_with_from_pretrained_and_equals_the_trained_weights(reference):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omni_train.tokenizer import load_tokenizer

    exported = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(reference / "export").eval()
    # The trained weights, consolidated by DeepSpeed's own tool from the final ZeRO-3 checkpoint.
    trained_sd = get_fp32_state_dict_from_zero_checkpoint(str(reference / "checkpoints"), tag=f"step_{STEPS:08d}")
    trained = Qwen2_5OmniThinkerForConditionalGeneration(exported.config).eval()
    missing, unexpected = trained.load_state_dict(
        {k.removeprefix("thinker."): v for k, v in trained_sd.items()}, strict=True
    )
    assert not missing and not unexpected

    tokenizer = load_tokenizer(str(reference / "export"))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], tokenize=True,
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, trained(input_ids=ids).logits
    assert torch.equal(a, b)
    generated = exported.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


def _tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))  # TensorBoard's own reader, purging as it does
    events.Reload()
    steps = [e.step for e in events.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag} at a step twice: {steps}"
    return {e.step: e.value for e in events.Scalars(tag)}


def test_killed_run_resumes_with_the_same_losses(reference, text_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_launch(*_args(run_dir, text_shards, "logging.tensorboard=true"))
    kill_job_when(proc, run_dir / "checkpoints" / "step_00000020" / "COMPLETE", "its step-20 checkpoint")
    assert not (run_dir / "checkpoints" / f"step_{STEPS:08d}").exists(), "the run finished before it was killed"

    # Only the run directory: the resumed run is the run it was (its saved config.yaml), not the defaults.
    result = run_launch(f"run_dir={run_dir}", "resume=auto")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"omni-launch: resuming with {run_dir / 'config.yaml'}" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 20
    resumed, uninterrupted = _losses(run_dir), _losses(reference)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-6), step
    # Evaluations and the best checkpoint's bookkeeping survive the kill too.
    resumed_evals, evals = _records(run_dir, "eval/loss"), _records(reference, "eval/loss")
    assert sorted(evals) == [0, 10, 20, 30] and sorted(resumed_evals) == sorted(evals)
    for step, value in evals.items():
        assert resumed_evals[step] == pytest.approx(value, rel=1e-6), step
    best = json.loads((reference / "checkpoints" / "best.json").read_text())
    assert best == json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["eval_loss"] == min(v for s, v in evals.items() if s > 0) and evals[best["step"]] == best["eval_loss"]
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == sorted({f"step_{best['step']:08d}", f"step_{STEPS:08d}"}), kept  # keep_last=1 and the best
    # TensorBoard (on from the saved config) holds each step once: the killed attempt's steps past 20 are purged.
    scalars = _tensorboard_scalars(run_dir, "loss")
    assert sorted(scalars) == list(range(1, STEPS + 1))
    for step, value in resumed.items():
        assert scalars[step] == pytest.approx(value, rel=1e-6), step
    assert sorted(_tensorboard_scalars(run_dir, "eval/loss")) == [0, 10, 20, 30]


def test_fresh_start_in_a_run_dir_with_checkpoints_is_refused(reference, text_shards):
    result = run_launch(*_args(reference, text_shards), timeout=120)
    assert result.returncode == 2
    assert "already holds checkpoints: pass resume=auto" in result.stderr


@pytest.fixture(scope="module")
def resumed(reference, text_shards, sample_shards, tmp_path_factory) -> dict[int, dict]:
    """The reference run's last checkpoint (2 ranks) resumed through the loop's setup by 2 ranks, then 3 steps with
    a NaN loss on rank 1 in the middle one (tests/helpers/resume_steps.py), and by 1 rank (resharded); both with a
    new peak learning rate."""
    ckpt = reference / "checkpoints" / f"step_{STEPS:08d}"
    out = tmp_path_factory.mktemp("resumed")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    results = {}
    for ranks in (2, 1):
        launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--standalone", f"--nproc_per_node={ranks}"]
        extra = [f"--speech={sample_shards}"] if ranks == 2 else []
        done = subprocess.run([*launcher, "-m", "tests.helpers.resume_steps", str(out / f"{ranks}.json"), *extra,
                               f"run_dir={out / str(ranks)}", f"resume={ckpt}", *data_args(text_shards),
                               f"trainer.max_steps={STEPS + 5}", f"trainer.lr={NEW_LR}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        results[ranks] = json.loads((out / f"{ranks}.json").read_text())
    return results


def test_a_checkpoint_of_two_ranks_resumes_on_one(reference, resumed):
    """Resharded (DeepSpeed's universal checkpoint): every parameter's full fp32 weights and AdamW moments, the
    AdamW step counts and the learning rate are those the 2 ranks restore themselves, bit for bit; the 1-rank
    loader reads the re-dealt rest of the epoch (its exactly-once delivery is tests/test_loader.py's); the next
    step trains."""
    two, one = resumed[2], resumed[1]
    assert two["world"] == 2 and one["world"] == 1 and one["start_step"] == two["start_step"] == STEPS
    assert two["adam_steps"] == one["adam_steps"] == [STEPS]
    from omni_train.train.engine import lr_lambda

    # the new trainer.lr takes effect on the restored schedule (warmup 3, min ratio 0.1 as configured)
    assert one["lr"] == two["lr"] == pytest.approx(NEW_LR * lr_lambda(STEPS, 3, STEPS + 5, 0.1), rel=1e-12)
    assert len(one["digests"]) == len(two["digests"]) > 0
    differ = [name for name in two["digests"] if one["digests"][name] != two["digests"][name]]
    assert not differ, f"weights or moments differ after resharding: {differ[:5]}"
    assert two["remainder_units"] == 0 and one["remainder_units"] > 0, "the 1-rank run reads the re-dealt epoch"
    assert math.isfinite(one["loss"]) and math.isfinite(two["loss"])
    assert (reference / "checkpoints" / f"step_{STEPS:08d}" / "universal").is_dir(), "converted once, beside it"


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(resumed):
    """NaN features on rank 1 alone: both ranks skip the step with every weight partition and AdamW moment bitwise
    unchanged and the schedule standing still; the next step trains; a non-finite weight on rank 1 stops a save on
    both ranks."""
    result = resumed[2]
    assert result["refused"] == [True, True], "a non-finite weight on one rank stops the save on both"
    first, skipped, after = result["steps"]
    assert first["applied"] and not first["unchanged"] and math.isfinite(first["loss"]) and first["moments"] > 0
    assert not skipped["applied"] and skipped["loss"] is not None and not math.isfinite(skipped["loss"])
    assert skipped["unchanged"], "the skipped step changed weights or optimizer state"
    assert after["applied"] and not after["unchanged"] and math.isfinite(after["loss"])
    assert skipped["lr"] != first["lr"] and after["lr"] == skipped["lr"], "the schedule stands still on a skip"


@pytest.mark.parametrize("source", ["export", "checkpoints/step_00000030"])
def test_zero3_loads_a_stage_result_exactly_and_frozen_weights_stay_bit_identical(reference, text_shards, tmp_path,
                                                                                  source):
    """Stage handoff under ZeRO-3: start from the reference run's export or its last DeepSpeed checkpoint, train
    only lm_head; every other weight of the new export equals the reference export bit for bit."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "handoff"
    result = run_launch(f"run_dir={run_dir}", *data_args(text_shards), f"model.path={reference / source}",
                        "trainer.max_steps=3", "trainer.warmup_steps=0", "stage.trainable=[thinker.lm_head.*]")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    before = load_file(reference / "export" / "model.safetensors")
    after = load_file(run_dir / "export" / "model.safetensors")
    assert summary["trainable_params"] == before["lm_head.weight"].numel()
    assert before.keys() == after.keys()
    for name in before:
        if name == "lm_head.weight":
            assert not torch.equal(before[name], after[name])
        else:
            assert torch.equal(before[name], after[name]), name


def test_resume_is_exact_with_decoding_worker_processes_and_a_corrupt_shard(sample_shards, tmp_path):
    """The multimodal stream through 2 ranks x 2 DataLoader workers, its first shard truncated: the lost samples
    are counted per source and warned about while training goes on, and a run restarted from its step-4
    checkpoint continues with exactly the losses of the uninterrupted run."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    first = sorted(shards.glob("shard-*.tar"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 3])
    args = [*data_args(shards, workers=2), "data.max_len=512", "trainer.max_steps=8", "trainer.save_every=4",
            "trainer.export=false"]
    full = tmp_path / "full"
    result = run_launch(f"run_dir={full}", *args)
    assert result.returncode == 0, result.stderr[-4000:]
    last = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["corrupt/data"] >= 1
    assert "omni-train: warning: corrupt samples set aside so far, by source: {'data':" in result.stderr
    restarted = tmp_path / "restarted"
    shutil.copytree(full, restarted)
    shutil.rmtree(restarted / "checkpoints" / "step_00000008")
    result = run_launch(f"run_dir={restarted}", *args, "resume=auto")
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((restarted / "summary.json").read_text())["resumed_from_step"] == 4
    assert _losses(restarted) == _losses(full)
