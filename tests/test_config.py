"""A bad configuration is refused with one clear line before any process starts."""

import pytest

from tests.conftest import data_args, launch_in_process, run_launch


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=no_such_preset", "model/no_such_preset"),
        ("trainer.lrr=0.1", "lrr"),
        ("trainer.micro_batch_size=-2", "trainer.micro_batch_size=-2 must be a positive integer"),
        ("trainer.max_steps=abc", "max_steps"),
        ("data.max_len=250", "data.max_len=250 must be a positive multiple of data.pad_to_multiple_of=64"),
        ("data.sources=[{name:x,path:/no/such/shards}]", "data source x: /no/such/shards does not exist"),
        ("data.sources=[{name:x,path:/tmp,weight:-1}]", "data source x: weight=-1.0 must be positive"),
        ("model.path=/nonexistent/ckpt", "model.path=/nonexistent/ckpt is not a directory"),
        ("stage.trainable=[thinker.nonexistent.*]", "match no parameter"),
        ("model.dtype=bfloat16", "model.dtype is now trainer.precision (bf16 | fp16 | fp32 | auto)"),
    ],
)
def test_bad_config_fails_with_one_clear_line(override, message, text_shards, tmp_path, monkeypatch, capsys):
    defaults = [a for a in data_args(text_shards) if a.split("=")[0] != override.split("=")[0]]
    code, err = launch_in_process(monkeypatch, capsys, *defaults, override, f"run_dir={tmp_path}/run")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err[-3000:]


def test_the_config_reference_is_generated_from_the_schema_and_current():
    from omni_train.tools.config_doc import PAGE, markdown

    page = markdown()
    assert "| `trainer.grad_accum` | int | `1` | Micro-batches per optimizer step" in page
    assert "| `format` | str | `auto` |" in page  # omni-prep build's keys too
    assert PAGE.read_text() == page, "docs/CONFIG.md is stale: run python -m omni_train.tools.config_doc"


def test_a_resumed_run_keeps_its_saved_config(text_shards, tmp_path):
    """resume=auto composes the run's saved config.yaml, not the defaults; what the command line sets goes on top;
    a change that would break the exact continuation is refused; an earlier config.yaml is kept, not replaced."""
    from omni_train.config.compose import compose
    from omni_train.errors import ConfigError
    from omni_train.train.loop import _save_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = compose([*data_args(text_shards), f"run_dir={run_dir}", "data.chunk_samples=16", "trainer.lr=3e-3"])
    _save_config(first, run_dir)
    again = compose([f"run_dir={run_dir}", "resume=auto"])
    assert (again.data.max_len, again.data.chunk_samples, again.trainer.lr) == (256, 16, 3e-3)
    assert again.data.sources == first.data.sources and again.resume == "auto"
    longer = compose([f"run_dir={run_dir}", "resume=auto", "trainer.max_steps=99", "trainer.lr=1e-4",
                      "launcher.nproc_per_node=1"])
    assert (longer.trainer.max_steps, longer.trainer.lr, longer.launcher.nproc_per_node) == (99, 1e-4, 1)
    assert longer.data.chunk_samples == 16
    for override, key in (("data.max_len=1024", "data.max_len would change from 256 to 1024"),
                          ("model=small", "model.preset would change from tiny to small"),
                          ("stage=talker_sft", "stage.objective would change from thinker to talker_sft")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            compose([f"run_dir={run_dir}", "resume=auto", override])
    assert compose([f"run_dir={run_dir}", "resume=auto", "data.max_len=256"]).data.max_len == 256  # unchanged: fine
    _save_config(longer, run_dir)
    assert "max_steps: 99" in (run_dir / "config.yaml").read_text()
    assert "max_steps: 30" in (run_dir / "config.1.yaml").read_text(), "the earlier config is kept"


def test_precision_auto_is_bf16_on_gpus_and_fp32_on_cpus(text_shards, tmp_path):
    """trainer.precision=auto: bf16 on GPU ranks when fp32 copies of the trained weights exist (DeepSpeed, or LoRA
    without it), fp32 on CPU ranks; what it resolves to reaches the DeepSpeed JSON, the model's dtype and the plan,
    and a config saved under the old key (model.dtype) resumes as trainer.precision."""
    import torch
    import yaml

    from omni_train.config.compose import compose
    from omni_train.config.schema import effective_precision
    from omni_train.config.validate import validate
    from omni_train.errors import ConfigError
    from omni_train.train.engine import deepspeed_config, training_dtype
    from omni_train.train.memory import estimate

    base = data_args(text_shards)
    zero3, plain = compose(base), compose([*base, "deepspeed=none", "launcher.nproc_per_node=1"])
    plain_lora = compose([*base, "deepspeed=none", "launcher.nproc_per_node=1", "stage.lora.enabled=true"])
    assert [effective_precision(c, gpu=True) for c in (zero3, plain, plain_lora)] == ["bf16", "fp32", "bf16"]
    assert [effective_precision(c, gpu=False) for c in (zero3, plain, plain_lora)] == ["fp32"] * 3
    assert effective_precision(compose([*base, "trainer.precision=fp16"]), gpu=False) == "fp16"
    # This machine has no GPU: auto trains in fp32, without DeepSpeed's 16-bit sections.
    assert not torch.cuda.is_available()
    ds = deepspeed_config(zero3, 2)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"], training_dtype(zero3)) == (False, False, torch.float32)
    bf16 = compose([*base, "trainer.precision=bf16"])
    assert deepspeed_config(bf16, 2)["bf16"]["enabled"] and training_dtype(bf16) == torch.bfloat16
    # The plan is a GPU's: auto is planned as bf16, half of fp32's parameter bytes.
    params = "parameters (ZeRO-3 shard)"
    assert estimate(zero3)[params] == estimate(bf16)[params] == estimate(
        compose([*base, "trainer.precision=fp32"]))[params] / 2
    with pytest.raises(ConfigError, match="deepspeed=none with trainer.precision=bf16 trains LoRA adapters only"):
        validate(compose([*base, "deepspeed=none", "launcher.nproc_per_node=1", "trainer.precision=bf16"]))
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    from omni_train.train.loop import _save_config

    _save_config(zero3, run_dir)
    old = yaml.safe_load((run_dir / "config.yaml").read_text())
    old["trainer"].pop("precision")
    old["model"]["dtype"] = "bfloat16"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert compose([f"run_dir={run_dir}", "resume=auto"]).trainer.precision == "bf16"
