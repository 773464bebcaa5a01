"""LoRA on the Thinker (stage.lora): 2 processes under DeepSpeed ZeRO-3 from the tiny Thinker export, with PEFT's
adapters on the language model and its final norm trained fully, each row shared by the 2 ranks (Ulysses), every
layer checkpointed and the MLPs tiled. The merged export is exactly the base plus PEFT's
delta, the adapter directory loads with PeftModel.from_pretrained onto transformers' Thinker, the checkpoints hold
the adapters only, and a run killed with SIGKILL resumes with the same losses. (The Talker's LoRA:
tests/test_talker_training.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omni_train.errors import ConfigError
from tests.conftest import REPO, data_args, kill_job_when, launch_in_process, run_launch, start_launch
from tests.helpers.lora import check_merged_export, weights

STEPS = 10
NORM = "thinker.model.language_model.norm.*"  # trained fully beside the adapters


def _args(run_dir: Path, base: Path, shards: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"model.path={base}", *data_args(shards), f"trainer.max_steps={STEPS}",
            "trainer.save_every=5", "trainer.keep_last=2", "trainer.lr=3e-3", "trainer.warmup_steps=0",
            "stage.lora.enabled=true", "stage.lora.r=4", "stage.lora.dropout=0.1", f"stage.lora.train_fully=[{NORM}]",
            # LoRA with what rows of 32k need: the 2 ranks share each row, layers recomputed, MLPs tiled
            "trainer.sequence_parallel=2", "trainer.checkpointing=full", "trainer.mlp_chunk=64"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def lora_run(tiny_export, text_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    result = run_launch(*_args(run_dir, tiny_export, text_shards))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_adapters_leave_the_model_unchanged_at_step_0(tiny_export):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omni_train.model.lora import attach

    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_export).eval()
    adapted = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_export).eval()
    names = attach(adapted, ["model.language_model.layers.*.self_attn.[qkvo]_proj"], 4, 8.0, 0.0, seed=1)
    assert len(names) == 4 * base.config.text_config.num_hidden_layers
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, adapted(input_ids=ids).logits)  # B = 0


def test_only_adapters_and_the_named_modules_train(lora_run, tiny_export):
    from peft import PeftModel
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omni_train.model.keymap import hub_name

    summary = json.loads((lora_run / "summary.json").read_text())
    layers = 2 * 7  # the tiny LLM: 2 layers x (q, k, v, o, gate, up, down)
    model = PeftModel.from_pretrained(Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_export),
                                      lora_run / "adapter")
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    hidden = model.base_model.model.config.text_config.hidden_size
    assert summary["trainable_params"] == adapters + hidden and summary["adapter"] == str(lora_run / "adapter")
    checked = check_merged_export(weights(tiny_export), weights(lora_run / "export"), model, hub_name,
                                  fully={"model.norm.weight"})
    assert checked == layers


def test_the_adapter_directory_loads_onto_transformers_thinker(lora_run, tiny_export):
    from peft import PeftModel
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 32
    assert config["base_model_name_or_path"] == str(tiny_export.resolve())
    assert config["modules_to_save"] == ["model.language_model.norm"]
    from safetensors import safe_open

    with safe_open(lora_run / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    # the released checkpoint's module names (model.layers.N, not transformers' model.language_model.layers.N)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_export).eval()
    peft_model = PeftModel.from_pretrained(Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_export),
                                           lora_run / "adapter").eval()
    merged = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(lora_run / "export").eval()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        served, ours, before = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(served, ours, rtol=1e-5, atol=1e-5)
    assert (ours - before).abs().max() > 1e-3  # the adapters changed what the model says


def test_checkpoints_hold_the_trained_parameters_only(lora_run, tiny_export):
    checkpoint = lora_run / "checkpoints" / f"step_{STEPS:08d}"
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    base = (tiny_export / "model.safetensors").stat().st_size
    assert size < base / 20, (size, base)
    state = json.loads((checkpoint / "run_state_rank0.json").read_text())
    assert state["adapters_only"] is True
    # Such a checkpoint cannot seed a stage (its base is not in it): the export can.
    from omni_train.model.build import check_checkpoint
    from tests.helpers.models import tiny_model_config

    with pytest.raises(ConfigError, match="LoRA run"):
        check_checkpoint(tiny_model_config(str(checkpoint)))


def test_a_lora_checkpoint_resumes_only_on_its_own_base(lora_run, tiny_export, tmp_path):
    """The checkpoint does not hold the base, so it records model.path's files; a base retrained since is refused."""
    import shutil

    from safetensors.torch import save_file

    from omni_train.config.compose import compose
    from omni_train.train.loop import _check_base

    checkpoint = lora_run / "checkpoints" / f"step_{STEPS:08d}"
    _check_base(compose([f"model.path={tiny_export}", "stage.lora.enabled=true"]), checkpoint)  # its own: fine
    moved = tmp_path / "retrained"
    shutil.copytree(tiny_export, moved)
    save_file({k: v * 1.001 for k, v in weights(tiny_export).items()}, moved / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="its files have changed since"):
        _check_base(compose([f"model.path={moved}", "stage.lora.enabled=true"]), checkpoint)


def test_a_killed_lora_run_resumes_with_the_same_losses(lora_run, tiny_export, text_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_launch(*_args(run_dir, tiny_export, text_shards))
    kill_job_when(proc, run_dir / "checkpoints" / "step_00000005" / "COMPLETE", "its step-5 checkpoint")
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"

    result = run_launch(f"run_dir={run_dir}", "resume=auto")
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] == 5
    resumed, uninterrupted = _losses(run_dir), _losses(lora_run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-6), step
    assert weights(run_dir / "export").keys() == weights(lora_run / "export").keys()


def test_lora_settings_are_checked_before_launch(monkeypatch, capsys, tiny_export, text_shards, tmp_path):
    from omni_train.model.lora import resolve, target_regex

    names = ["m.layers.0.q", "m.layers.1.q", "m.layers.0.k", "lm_head"]
    with pytest.raises(ConfigError, match="select no Linear module"):
        resolve(names, ["m.layers.*.v"])
    with pytest.raises(ConfigError, match="head takes no adapter"):
        resolve(names, ["lm_head"])
    import re

    for chosen in (["m.layers.0.q", "m.layers.1.q"], ["m.layers.1.q", "m.layers.0.k"]):
        regex = target_regex(chosen, names)
        assert [n for n in names if re.fullmatch(regex, n)] == sorted(chosen, key=names.index), regex
    code, err = launch_in_process(monkeypatch, capsys, f"run_dir={tmp_path / 'run'}", f"model.path={tiny_export}",
                                  *data_args(text_shards), "stage.lora.enabled=true",
                                  "stage.lora.targets=[thinker.lm_head]")
    assert code == 2 and "head takes no adapter" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_one_process_without_deepspeed_trains_as_zero3_does_and_resumes(lora_run, text_shards, tmp_path):
    """deepspeed=none (omni_train/train/plain.py) on one process, starting from the merged export of a LoRA stage:
    the same losses and gradient norms as DeepSpeed's ZeRO-3 engine on one process (accumulation, clipping, AdamW,
    schedule), and a resume from its step-3 checkpoint continues with the same losses (tests/helpers/plain_steps.py,
    through the loop's own setup and steps)."""
    out = tmp_path / "steps.json"
    done = subprocess.run([sys.executable, "-m", "tests.helpers.plain_steps", str(out), str(tmp_path),
                           f"model.path={lora_run / 'export'}", *data_args(text_shards), "trainer.lr=3e-3",
                           "trainer.warmup_steps=0", "trainer.grad_accum=2", "stage.lora.enabled=true",
                           "stage.lora.dropout=0", "launcher.nproc_per_node=1"],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    arms = {name: {int(k): v for k, v in steps.items()} for name, steps in json.loads(out.read_text()).items()}
    assert sorted(arms["plain"]) == sorted(arms["zero3"]) == [1, 2, 3, 4, 5, 6] and sorted(arms["resumed"]) == [4, 5, 6]
    for step, (loss, norm) in arms["plain"].items():
        assert loss == pytest.approx(arms["zero3"][step][0], rel=1e-5), (step, loss, arms["zero3"][step])
        assert norm == pytest.approx(arms["zero3"][step][1], rel=1e-4), (step, norm, arms["zero3"][step])
    for step, (loss, norm) in arms["resumed"].items():
        assert loss == pytest.approx(arms["plain"][step][0], rel=1e-6, abs=1e-6), step
        assert norm == pytest.approx(arms["plain"][step][1], rel=1e-5), step
