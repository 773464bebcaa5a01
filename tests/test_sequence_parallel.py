"""Ulysses sequence parallelism: 2 ranks sharing each packed row under ZeRO-3 give the loss and gradients of 1 rank
holding it whole (packed samples of every kind, encoders included, 3-D TMRoPE positions), and the config refuses a
degree the heads cannot be split by."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from omni_train.config.compose import compose
from omni_train.config.validate import validate
from omni_train.errors import ConfigError
from tests.conftest import REPO


def _step(model, shards, out, sp: int, control: bool = False, kinds: str | None = None, rows: int = 2,
          overrides: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={sp}",
           "-m", "tests.helpers.sp_step", "--model", str(model), "--shards", str(shards), "--out", str(out),
           "--sp", str(sp), "--rows", str(rows), *(["--control"] if control else []),
           *(["--kinds", kinds] if kinds else []), *(f"--override={o}" for o in overrides)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def whole(tiny_export, sample_shards, tmp_path_factory):
    return _step(tiny_export, sample_shards, tmp_path_factory.mktemp("sp1") / "out.pt", sp=1)


def test_two_ranks_sharing_each_row_give_the_loss_and_gradients_of_one(whole, tiny_export, sample_shards, tmp_path):
    split = _step(tiny_export, sample_shards, tmp_path / "out.pt", sp=2)
    assert split["length"] == whole["length"] and whole["length"] % 2 == 0
    torch.testing.assert_close(split["loss"], whole["loss"], rtol=1e-6, atol=0)
    assert split["metrics"].keys() == whole["metrics"].keys()
    for key, want in whole["metrics"].items():
        assert split["metrics"][key] == pytest.approx(want, rel=1e-6, abs=1e-6), key
    counts = {k: n for k, n in whole["metrics"].items() if k.startswith("label_tokens/")}
    assert len(counts) == 4 and all(counts.values()), "every condition (text, audio, image, video) has labels"
    assert split["grads"].keys() == whole["grads"].keys()
    encoders = [n for n in whole["grads"] if ".audio_tower." in n or ".visual." in n]
    assert encoders and all(whole["grads"][n].abs().sum() > 0 for n in encoders if "proj" in n or "merger" in n)
    for name, want in whole["grads"].items():
        scale = float(want.abs().max())
        torch.testing.assert_close(split["grads"][name], want, rtol=0, atol=3e-5 * scale + 1e-9, msg=name)


def test_checkpointing_offload_and_tiled_mlp_under_zero3_keep_the_gradients(whole, tiny_export, sample_shards,
                                                                           tmp_path):
    """Every layer recomputed from host-held inputs and every MLP run 64 tokens a tile (DeepSpeed's TiledMLP holds
    back ZeRO-3's gradient reduction until the last tile), on 2 ranks sharing each row: still the plain step."""
    changed = _step(tiny_export, sample_shards, tmp_path / "out.pt", sp=2,
                    overrides=("trainer.checkpointing=full", "trainer.offload_activations=true",
                               "trainer.mlp_chunk=64"))
    torch.testing.assert_close(changed["loss"], whole["loss"], rtol=1e-6, atol=0)
    for name, want in whole["grads"].items():
        scale = float(want.abs().max())
        torch.testing.assert_close(changed["grads"][name], want, rtol=0, atol=3e-5 * scale + 1e-9, msg=name)


def test_a_rank_without_media_to_encode_and_a_short_micro_batch_still_match(tiny_export, sample_shards, tmp_path):
    """One image and two texts in one row (micro_batch_size is 2: the loader's last rows of a window come like
    this): the image goes to one rank's vision encoder, the other rank runs the dummy; no audio at all: both run
    the audio dummy."""
    kinds = "image-,text-0001,text-0002"
    whole = _step(tiny_export, sample_shards, tmp_path / "one.pt", sp=1, kinds=kinds, rows=1)
    split = _step(tiny_export, sample_shards, tmp_path / "two.pt", sp=2, kinds=kinds, rows=1)
    torch.testing.assert_close(split["loss"], whole["loss"], rtol=1e-6, atol=0)
    for name, want in whole["grads"].items():
        scale = float(want.abs().max())
        torch.testing.assert_close(split["grads"][name], want, rtol=0, atol=3e-5 * scale + 1e-9, msg=name)


def test_control_attention_across_packed_samples_changes_the_loss(whole, tiny_export, sample_shards, tmp_path):
    """DeepSpeed's wrapper drops the mask: causal attention over the whole gathered row crosses samples."""
    crossed = _step(tiny_export, sample_shards, tmp_path / "out.pt", sp=2, control=True)
    assert abs(float(crossed["loss"]) - float(whole["loss"])) > 1e-4


def _validate(*overrides: str) -> None:
    validate(compose(["data.sources=[{name:x,path:%s}]" % REPO, *overrides]))


def test_a_degree_the_heads_cannot_split_is_refused():
    # tiny: 4 query heads, 2 key/value heads (degree 4 replicates the key/value heads, as Ulysses does).
    _validate("trainer.sequence_parallel=4", "launcher.nproc_per_node=4")
    with pytest.raises(ConfigError, match="3 does not divide the 4 query heads"):
        _validate("trainer.sequence_parallel=3", "launcher.nproc_per_node=3")


def test_the_7b_heads_allow_degrees_2_and_4_but_not_7():
    for degree in (2, 4):
        _validate("model=qwen2_5_omni_7b", f"trainer.sequence_parallel={degree}", f"launcher.nproc_per_node={degree}")
    with pytest.raises(ConfigError, match="7 and the 4 key/value heads must divide one another"):
        _validate("model=qwen2_5_omni_7b", "trainer.sequence_parallel=7", "launcher.nproc_per_node=7")


def test_a_world_or_row_the_degree_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        _validate("trainer.sequence_parallel=2", "launcher.nproc_per_node=3")
    with pytest.raises(ConfigError, match="pad_to_multiple_of=2 must be a multiple of trainer.sequence_parallel=4"):
        _validate("trainer.sequence_parallel=4", "launcher.nproc_per_node=4", "data.pad_to_multiple_of=2")


def test_an_attention_kernel_this_machine_cannot_run_is_refused_by_the_training_processes():
    """The 3B and 7B presets ask for flash_attention_2; where transformers finds no flash-attn with a GPU (here), the
    training processes stop with one line (omni-launch itself may run on a login node, so it does not decide)."""
    from transformers.utils import is_flash_attn_2_available

    from omni_train.config.validate import check_world

    cfg = compose(["model=qwen2_5_omni_7b"])
    assert str(cfg.model.attn_implementation) == "flash_attention_2"
    if is_flash_attn_2_available():
        check_world(cfg, 2)
        return
    with pytest.raises(ConfigError, match="install flash-attn, or set model.attn_implementation=sdpa"):
        check_world(cfg, 2)
    check_world(compose(["model=qwen2_5_omni_7b", "model.attn_implementation=sdpa"]), 2)
