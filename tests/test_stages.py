"""Stage presets compose from Hydra alone and freeze what the paper's stages freeze."""

from __future__ import annotations

import fnmatch

import pytest

from omni_train.config.compose import compose
from omni_train.train.engine import patterns
from omni_train.model.build import parameter_names


def _trainable(stage: str) -> tuple[set[str], set[str]]:
    cfg = compose([f"stage={stage}"])
    names = parameter_names(cfg.model)
    train = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns(cfg.stage.trainable))}
    return train, set(names) - train


def test_stage1_trains_the_encoders_and_freezes_the_llm():
    train, frozen = _trainable("stage1_align")
    assert train and all(n.startswith(("thinker.model.audio_tower.", "thinker.model.visual.")) for n in train)
    assert any(".audio_tower.proj." in n for n in train) and any(".visual.merger." in n for n in train)
    assert all(n in frozen for n in parameter_names(compose([]).model)
               if n.startswith(("thinker.model.language_model.", "thinker.lm_head.")))


def test_stage1_adapters_train_only_the_projections():
    train, _ = _trainable("stage1_adapters")
    assert train and all(".audio_tower.proj." in n or ".audio_tower.ln_post." in n or ".visual.merger." in n
                         for n in train)


@pytest.mark.parametrize("stage, max_len, checkpointing", [("stage2_multimodal", 8192, "none"),
                                                            ("stage3_long", 32768, "full")])
def test_later_stages_train_everything_at_their_lengths(stage, max_len, checkpointing):
    train, frozen = _trainable(stage)
    assert not frozen
    cfg = compose([f"stage={stage}"])
    assert (cfg.data.max_len, cfg.trainer.checkpointing) == (max_len, checkpointing)


def test_module_groups_and_patterns_mix_and_a_typo_is_named():
    from omni_train.errors import ConfigError
    from omni_train.train.engine import check_patterns

    names = parameter_names(compose([]).model)
    check_patterns(names, ["llm", "thinker.model.visual.merger.*"])
    with pytest.raises(ConfigError, match=r"match no parameter: \['audio_encodr'\].*groups: llm, audio_encoder"):
        check_patterns(names, ["llm", "audio_encodr"])
