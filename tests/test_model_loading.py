"""`model.path` loads both checkpoint layouts exactly, and a mismatched checkpoint fails with the key lists."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from omni_train.config import ConfigError, ModelConfig
from omni_train.model import build_thinker, omni_config, thinker_parameter_names
from tests.conftest import REPO


def _tiny() -> ModelConfig:
    preset = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    return ModelConfig(preset="tiny", hf_config=OmegaConf.to_container(preset.hf_config))


def _released_layout(tmp_path, state: dict[str, torch.Tensor]):
    """A checkpoint directory in the released Qwen2.5-Omni layout: full config, weights under `thinker.`."""
    omni_config(_tiny()).save_pretrained(tmp_path)
    tensors = {f"thinker.{k}": v.contiguous() for k, v in state.items()}
    tensors["talker.codec_head.weight"] = torch.zeros(2, 2)  # other components' weights are ignored
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_released_layout_loads_every_thinker_weight_exactly(tmp_path):
    torch.manual_seed(0)
    source = build_thinker(_tiny(), ds_config=None)
    ckpt = _released_layout(tmp_path, source.state_dict())
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    torch.manual_seed(1)
    loaded = build_thinker(ModelConfig(preset="tiny", path=str(ckpt), hf_config=_tiny().hf_config), ds_config=None)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_missing_weights_fails_listing_them(tmp_path):
    state = build_thinker(_tiny(), ds_config=None).state_dict()
    del state["lm_head.weight"]
    ckpt = _released_layout(tmp_path, state)
    with pytest.raises(ConfigError, match=r"missing \['lm_head.weight'\]"):
        build_thinker(ModelConfig(preset="tiny", path=str(ckpt), hf_config=_tiny().hf_config), ds_config=None)


def test_parameter_names_come_from_a_meta_model_without_weights():
    names = thinker_parameter_names(_tiny())
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
