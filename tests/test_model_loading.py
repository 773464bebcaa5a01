"""`model.path` loads both checkpoint layouts exactly, and a mismatched checkpoint fails with the key lists."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from omni_train.config.schema import ModelConfig
from omni_train.errors import ConfigError
from omni_train.model.build import build_thinker, omni_config, parameter_names
from tests.conftest import REPO


def _tiny() -> ModelConfig:
    preset = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    return ModelConfig(preset="tiny", hf_config=OmegaConf.to_container(preset.hf_config))


def _released_layout(tmp_path, thinker, drop: str | None = None):
    """A checkpoint directory in the released Qwen2.5-Omni layout, made by transformers itself: the Thinker's
    `save_pretrained` writes the hub names (`model.*`, `audio_tower.*`, `visual.*`, `lm_head.*`), the released
    checkpoint holds them under `thinker.` beside the Talker's and Token2Wav's."""
    thinker.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as f:
        tensors = {f"thinker.{k}": f.get_tensor(k) for k in f.keys() if k != drop}
    assert "thinker.model.layers.0.self_attn.q_proj.weight" in tensors and "thinker.audio_tower.conv1.weight" in tensors
    tensors["talker.codec_head.weight"] = torch.zeros(2, 2)  # other components' weights are ignored
    ckpt = tmp_path / "released"
    omni_config(_tiny()).save_pretrained(ckpt)
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


def _equal_weights(a, b) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_released_layout_loads_every_thinker_weight_exactly(tmp_path):
    torch.manual_seed(0)
    source = build_thinker(_tiny(), ds_config=None)
    ckpt = _released_layout(tmp_path, source)
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    torch.manual_seed(1)
    loaded = build_thinker(ModelConfig(preset="tiny", path=str(ckpt), hf_config=_tiny().hf_config), ds_config=None)
    _equal_weights(source, loaded)


def test_our_export_is_in_the_hub_layout_and_transformers_loads_it(tmp_path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omni_train.train.export import export_pretrained
    from omni_train.model.keymap import hub_name

    torch.manual_seed(0)
    source = build_thinker(_tiny(), ds_config=None)
    export_pretrained(source, tmp_path / "export", rename=hub_name)
    source.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "export" / "model.safetensors", framework="pt") as ours, \
            safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as theirs:
        assert set(theirs.keys()) <= set(ours.keys())
    _equal_weights(source, Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tmp_path / "export"))
    loaded = build_thinker(ModelConfig(preset="tiny", path=str(tmp_path / "export"), hf_config=_tiny().hf_config),
                           ds_config=None)
    _equal_weights(source, loaded)


def test_checkpoint_missing_weights_fails_listing_them(tmp_path):
    ckpt = _released_layout(tmp_path, build_thinker(_tiny(), ds_config=None), drop="lm_head.weight")
    with pytest.raises(ConfigError, match=r"missing \['lm_head.weight'\]"):
        build_thinker(ModelConfig(preset="tiny", path=str(ckpt), hf_config=_tiny().hf_config), ds_config=None)


def test_parameter_names_come_from_a_meta_model_without_weights():
    names = parameter_names(_tiny())
    assert "thinker.lm_head.weight" in names
    assert any(n.startswith("thinker.model.audio_tower.") for n in names)
    assert any(n.startswith("thinker.model.visual.merger.") for n in names)


def test_7b_preset_has_the_released_component_sizes():
    """Built on the meta device: LLM 7.6B (Qwen2.5-7B), vision ~675M (Qwen2.5-VL ViT), audio ~640M (Whisper-large-v3
    encoder + projection)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    preset = OmegaConf.load(REPO / "conf" / "model" / "qwen2_5_omni_7b.yaml")
    config = omni_config(ModelConfig(preset="qwen2_5_omni_7b", hf_config=OmegaConf.to_container(preset.hf_config)))
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)

    def billions(module):
        return sum(p.numel() for p in module.parameters()) / 1e9

    assert billions(thinker.model.language_model) + billions(thinker.lm_head) == pytest.approx(7.62, abs=0.01)
    assert billions(thinker.model.visual) == pytest.approx(0.675, abs=0.01)
    assert billions(thinker.model.audio_tower) == pytest.approx(0.64, abs=0.01)


def test_progress_of_long_work_says_the_share_done_and_the_time_left_and_nothing_for_short_work(capsys,
                                                                                                 monkeypatch):
    from omni_train import progress

    clock = iter([0.0, 10.0, 40.0, 45.0, 100.0])  # start, three advances, close
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    work = progress.Progress("export to out", 4 * 2**30)
    for _ in range(3):
        work.advance(2**30)
    work.close()
    assert capsys.readouterr().err.splitlines() == [
        "omni-train: export to out: 2.0 of 4.0 GB (50%), 40 s so far, about 40 s left",
        "omni-train: export to out: 3.0 GB in 100 s"]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: 1.0)
    quick = progress.Progress("loading x", 2**30)
    quick.advance(2**30)
    quick.close()
    assert capsys.readouterr().err == ""
