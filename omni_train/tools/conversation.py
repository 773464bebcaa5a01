"""One conversation through the training data path, and transformers' Thinker inputs made from it.

Owns `prepare_sample` (a manifest record -> the `ModelSample` training would see, with its shard json: omni-prep's
prepare, then the loader's decode; npy and json members decoded as the loader's safe decoder does, never pickle),
`thinker_inputs` (our ids and media features -> the keyword arguments of transformers'
`Qwen2_5OmniThinkerForConditionalGeneration.forward`/`generate`: one padded log-mel row per clip with its
`feature_attention_mask`, images and videos apart with their grids, each video's seconds per grid, and whether a
video's audio is interleaved; transformers then computes the TMRoPE positions itself, which tests hold equal to
ours) and `absolute_media`. Used by `omni-train pairs`, the speech and answer tasks of `omni-train eval`, and the
Thinker recogniser.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_prep.chatml import media_parts
from omni_train.data.batch import ModelSample, decode_sample, to_device


class PreparedSample(NamedTuple):
    sample: ModelSample  # what the training forward reads
    info: dict  # the shard json (media sizes, seconds per grid, use_audio_in_video)
    modalities: tuple[str, ...]  # as index.json counts them: ("audio",), ("image", "video", "video_audio"), ("text",)


def prepare_sample(record: dict, base: Path, tokenizer) -> PreparedSample:
    """One manifest record, media paths relative to `base`, as training would see it. Raises data_prep's
    SampleError (or ValueError from a decode) for a record that training would set aside."""
    from data_prep.build import prepare
    from data_prep.config import PrepConfig

    prepared = prepare(record.get("id", "prompt"), record, base, PrepConfig(), tokenizer)
    raw = {k: (json.loads(v) if k == "json" else np.load(io.BytesIO(v), allow_pickle=False) if k.endswith(".npy")
               else v) for k, v in prepared.files.items()}
    return PreparedSample(decode_sample(raw), raw["json"], prepared.modalities)


def thinker_inputs(input_ids: torch.Tensor, audio: list[torch.Tensor] = (), vision: list[torch.Tensor] = (),
                   grids: list = (), kinds: list[str] = (), seconds_per_grid: list[float] = (),
                   use_audio_in_video: bool = False) -> dict:
    """Keyword arguments of transformers' Thinker for one unpadded sequence `input_ids` (1-D) whose media are
    `audio` (log-mel clips, mel x frames, in order, a video's audio included) and `vision` (patch rows of each
    image or video in order, `kinds[i]` saying which, `grids[i]` its t/h/w); `seconds_per_grid` per video."""
    inputs = {"input_ids": input_ids[None], "attention_mask": torch.ones_like(input_ids)[None]}
    if audio:
        frames = max(clip.shape[1] for clip in audio)
        inputs["input_features"] = torch.stack(
            [torch.nn.functional.pad(clip, (0, frames - clip.shape[1])) for clip in audio])
        inputs["feature_attention_mask"] = torch.stack(
            [torch.arange(frames) < clip.shape[1] for clip in audio]).long()
    for kind, pixels, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
        picked = [i for i, k in enumerate(kinds) if k == kind]
        if picked:
            inputs[pixels] = torch.cat([vision[i] for i in picked])
            inputs[grid_key] = torch.tensor([list(grids[i]) for i in picked])
    if "video" in kinds:
        inputs["video_second_per_grid"] = torch.tensor(list(seconds_per_grid), dtype=torch.float32)
        inputs["use_audio_in_video"] = use_audio_in_video
    return inputs


def sample_inputs(prepared: PreparedSample, input_ids: torch.Tensor) -> dict:
    """`thinker_inputs` of a prepared sample's media with `input_ids` (a prefix of its ids holding all its media,
    continued by generated tokens, or not)."""
    sample, info = prepared.sample, prepared.info
    return thinker_inputs(input_ids, sample.audio, sample.vision, sample.grids, sample.vision_kinds,
                          [m["second_per_grid"] for m in info["media"] if m["type"] == "video"],
                          bool(info.get("use_audio_in_video", False)))


def absolute_media(messages: list[dict], base: Path) -> list[dict]:
    """A copy of `messages` whose relative media paths are made absolute against `base`."""
    out = copy.deepcopy(messages)
    for part in media_parts(out):
        ref = part[part["type"]]
        if isinstance(ref, str) and not Path(ref).is_absolute() and "://" not in ref:
            part[part["type"]] = str((base / ref).resolve())
    return out


def greedy_answer(thinker, tokenizer, inputs: dict, max_new_tokens: int) -> tuple[str, torch.Tensor]:
    """transformers' greedy `generate` of the Thinker after `inputs` (`thinker_inputs`, on the host; run on the
    Thinker's device), up to <|im_end|> or `max_new_tokens`: the answer's text (special tokens left out) and its token
    ids on the host (the stop token included)."""
    from omni_train.tokens import IM_END, PAD

    with torch.no_grad():
        out = thinker.generate(**to_device(inputs, thinker.device), max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=[IM_END, PAD], pad_token_id=PAD)
    new = out[0, inputs["input_ids"].shape[1]:].cpu()
    return tokenizer.decode(new, skip_special_tokens=True), new
