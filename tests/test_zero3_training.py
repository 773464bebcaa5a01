"""The spine end to end: 2 processes on gloo under the real DeepSpeed ZeRO-3 engine, the real tiny Qwen2.5-Omni
Thinker and the real tokenizer; training, sharding, kill + resume, and export to a transformers checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, data_args, launch_cmd, run_launch

STEPS = 30


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


def test_killed_run_resumes_with_the_same_losses(reference, text_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(launch_cmd(*_args(run_dir, text_shards)), cwd=REPO, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = run_dir / "checkpoints" / "step_00000020" / "COMPLETE"
    deadline = time.time() + 400
    while not marker.exists():
        assert proc.poll() is None, f"run ended before its step-20 checkpoint: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no step-20 checkpoint in time"
        time.sleep(0.05)
    # The whole job dies at once, as when a node is lost: the launcher, torchrun and every worker.
    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in job:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(job, timeout=30)
    proc.wait()
    assert not (run_dir / "checkpoints" / f"step_{STEPS:08d}").exists(), "the run finished before it was killed"

    result = run_launch(*_args(run_dir, text_shards, "resume=auto"))
    assert result.returncode == 0, result.stderr[-4000:]
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


def test_fresh_start_in_a_run_dir_with_checkpoints_is_refused(reference, text_shards):
    result = run_launch(*_args(reference, text_shards), timeout=120)
    assert result.returncode == 2
    assert "already holds checkpoints: pass resume=auto" in result.stderr


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


def test_resume_is_exact_with_decoding_worker_processes(sample_shards, tmp_path):
    """The multimodal stream through 2 ranks x 2 DataLoader workers: a run restarted from its step-6 checkpoint
    continues with exactly the losses of the uninterrupted run."""
    import shutil

    args = [*data_args(sample_shards, workers=2), "data.max_len=512", "trainer.max_steps=12", "trainer.save_every=6",
            "trainer.export=false"]
    full = tmp_path / "full"
    result = run_launch(f"run_dir={full}", *args)
    assert result.returncode == 0, result.stderr[-4000:]
    restarted = tmp_path / "restarted"
    shutil.copytree(full, restarted)
    shutil.rmtree(restarted / "checkpoints" / "step_00000012")
    result = run_launch(f"run_dir={restarted}", *args, "resume=auto")
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((restarted / "summary.json").read_text())["resumed_from_step"] == 6
    assert _losses(restarted) == _losses(full)


def test_corrupt_shard_is_counted_per_source_and_warned_about_while_training_goes_on(sample_shards, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    first = sorted(shards.glob("shard-*.tar"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 3])
    run_dir = tmp_path / "run"
    result = run_launch(f"run_dir={run_dir}", *data_args(shards), "data.max_len=512", "trainer.max_steps=6",
                        "trainer.export=false")
    assert result.returncode == 0, result.stderr[-4000:]
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["corrupt/data"] >= 1
    assert "omni-train: warning: corrupt samples set aside so far, by source: {'data':" in result.stderr
