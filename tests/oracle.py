"""Oracles no one here wrote: transformers' own Qwen2.5-Omni code, called directly.

`transformers_layout(text, media, use_audio_in_video)` expands the single placeholders of a ChatML text with
`Qwen2_5OmniProcessor`'s replacement methods, tokenizes it, and computes positions with the Thinker's
`get_rope_index`, from nothing but media sizes (grid_thw, audio sample counts, seconds per grid).
"""

from __future__ import annotations

import functools
import types

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import Qwen2_5OmniProcessor

from data_prep.layout import Media, audio_tokens, mel_frames
from omni_train.config.schema import ModelConfig
from omni_train.model.build import build_thinker
from omni_train.tokenizer import load_tokenizer
from tests.conftest import REPO


@functools.cache
def thinker():
    preset = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    return build_thinker(ModelConfig(preset="tiny", hf_config=OmegaConf.to_container(preset.hf_config)), None)


def processor_text(text: str, media: list[Media], use_audio_in_video: bool) -> str:
    """Expand placeholders with the processor's own replacement methods (5.24), item by item."""
    fake = types.SimpleNamespace(
        audio_token="<|AUDIO|>", video_token="<|VIDEO|>", image_token="<|IMAGE|>", audio_bos_token="<|audio_bos|>",
        audio_eos_token="<|audio_eos|>", video_processor=types.SimpleNamespace(merge_size=2),
        image_processor=types.SimpleNamespace(merge_size=2),
    )
    fake.get_chunked_index = functools.partial(Qwen2_5OmniProcessor.get_chunked_index, fake)
    out, rest = [], text
    for item in media:
        marker = {"audio": "<|AUDIO|>", "image": "<|IMAGE|>", "video": "<|VIDEO|>"}[item.type]
        head, rest = rest.split(marker, 1)
        out.append(head)
        if item.type == "audio":
            rep = Qwen2_5OmniProcessor.replace_audio_token(
                fake, {"num_audio_tokens": [audio_tokens(item.audio_samples)]}, 0)
        elif item.type == "image":
            rep = Qwen2_5OmniProcessor.replace_image_token(fake, {"image_grid_thw": [torch.tensor(item.grid_thw)]}, 0)
        elif use_audio_in_video:
            rep = Qwen2_5OmniProcessor.replace_video_with_audio_token(
                fake, {"video_grid_thw": [torch.tensor(item.grid_thw)], "video_second_per_grid": [item.second_per_grid]},
                0, {"num_audio_tokens": [audio_tokens(item.audio_samples)]}, 0,
                position_id_per_seconds=25, seconds_per_chunk=2.0)
        else:
            rep = "<|VIDEO|>" * (int(np.prod(item.grid_thw)) // 4)
        out.append(rep)
    out.append(rest)
    return "".join(out)


def transformers_layout(text: str, media: list[Media], use_audio_in_video: bool):
    tok = load_tokenizer()
    ids = torch.tensor([tok(processor_text(text, media, use_audio_in_video), add_special_tokens=False).input_ids])
    images = [m.grid_thw for m in media if m.type == "image"]
    videos = [m for m in media if m.type == "video"]
    audio_frames = [mel_frames(m.audio_samples) for m in media
                    if m.type == "audio" or (m.type == "video" and use_audio_in_video)]
    positions, _ = thinker().get_rope_index(
        ids,
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor([v.grid_thw for v in videos]) if videos else None,
        attention_mask=torch.ones_like(ids),
        use_audio_in_video=use_audio_in_video,
        audio_seqlens=torch.tensor(audio_frames) if audio_frames else None,
        second_per_grids=torch.tensor([v.second_per_grid for v in videos]) if videos else None,
    )
    return ids[0].numpy(), positions[:, 0].numpy()
