"""The tiny preset as a ModelConfig, for tests that build models in-process (without Hydra's composition)."""

from __future__ import annotations

from omegaconf import OmegaConf

from omni_train.config.schema import ModelConfig
from tests.conftest import REPO


def tiny_model_config(path: str | None = None) -> ModelConfig:
    preset = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    return ModelConfig(preset="tiny", path=path, hf_config=OmegaConf.to_container(preset.hf_config))
