"""Tiny random stand-ins for the three models the paper composes the Thinker from (Qwen2.5, Whisper-large-v3,
Qwen2.5-VL), shaped like a preset's Thinker parts and written by transformers' own classes, so the composition
path (omni_train/model/keymap.py) runs offline in the demo and the tests. Real runs point model.compose at the released
checkpoints instead."""

from __future__ import annotations

from pathlib import Path

import torch

from omni_train.config.schema import ModelConfig
from omni_train.model.build import omni_config


def write_tiny_sources(root: Path, model: ModelConfig, vision_depth: int | None = None) -> dict[str, str]:
    """Tiny random Qwen2ForCausalLM, WhisperModel and Qwen2_5_VLForConditionalGeneration shaped like the
    preset's Thinker parts, saved by transformers (their on-disk layouts). Returns model.compose's paths by role;
    `vision_depth` gives the vision tower another depth (a mismatching source, for tests)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Config,
        Qwen2ForCausalLM,
        WhisperConfig,
        WhisperModel,
    )
    from transformers.utils import logging as hf_logging

    thinker = omni_config(model).thinker_config
    text, audio, vision = thinker.text_config, thinker.audio_config, thinker.vision_config
    torch.manual_seed(7)
    llm = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size, vocab_size=text.vocab_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, rope_theta=1e6, tie_word_embeddings=False))
    whisper = WhisperModel(WhisperConfig(
        d_model=audio.d_model, encoder_layers=audio.encoder_layers, encoder_attention_heads=audio.encoder_attention_heads,
        encoder_ffn_dim=audio.encoder_ffn_dim, num_mel_bins=audio.num_mel_bins, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=51866, max_source_positions=1500))
    vl_vision = {k: getattr(vision, k) for k in ("hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                                                 "fullatt_block_indexes", "window_size", "patch_size",
                                                 "spatial_merge_size", "temporal_patch_size")}
    vl = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000),
        vision_config={**vl_vision, "depth": vision_depth or vision.depth}))
    hf_logging.disable_progress_bar()  # save_pretrained's shard bar, three times per call
    paths = {}
    for role, source in (("llm", llm), ("audio", whisper), ("vision", vl)):
        paths[role] = str(Path(root) / role)
        source.save_pretrained(paths[role])
    return paths
