"""Shard samples -> model samples -> packed batches.

Owns: decoding one shard sample into model inputs (`ModelSample`: tokens, labels, TMRoPE positions, log-mel
features per audio clip, vision patch rows per image/video), best-fit packing of samples into rows of `max_len`
tokens, and collation of packed rows into the batch the Thinker objective takes.

A packed row is samples laid end to end, each keeping its own TMRoPE positions (3 x L, starting at 0), plus a
fourth, leading position row of plain per-sample text positions (0, 1, ... restarting at every sample). The row's
tail padding is one more "sample" of pad tokens with no labels. The same boundaries travel once more, as the
attention kernels want them: `cu_seq_lens` (int32, where each sample starts in the micro-batch's rows laid end to
end, then the total) and `max_length` (the longest sample, a Python int), computed here on the host once per
micro-batch, so the packed attention core (omni_train.model.kernels.attention) never reads positions back from the
device to find where samples end; attention never crosses samples. Media tensors are concatenated in order of
appearance across the whole batch, matching the order of their placeholder tokens. `conditions` marks, per token,
which media its sample holds (bits AUDIO_BIT, IMAGE_BIT, VIDEO_BIT; 0 for text-only), for per-modality metrics.
A batch of samples with speech also carries, per sample, what the Talker objective lays out from it (`Spoken`: its
place, its prompt and reply lengths, its codes' lengths), found here on the host for the same reason.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from data_prep.media import decode_flac
from omni_train.data.features import log_mel, patchify
from omni_train.tokens import IGNORE

AUDIO_BIT, IMAGE_BIT, VIDEO_BIT = 1, 2, 4
CONDITIONS = {"text": 0, "audio": AUDIO_BIT, "image": IMAGE_BIT, "video": VIDEO_BIT}


@dataclass
class Speech:
    """The spoken last assistant turn: codec ids (chosen; rejected for a DPO triplet), speaker, reference log-probs."""

    chosen: torch.Tensor  # (T,) int64
    rejected: torch.Tensor | None
    speaker: str | None
    ref_logps: tuple[float, float] | None


@dataclass
class ModelSample:
    id: str
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,)
    positions: torch.Tensor  # (3, L)
    audio: list[torch.Tensor]  # (128, frames) per clip, in order of appearance
    vision: list[torch.Tensor]  # (rows, 1176) per image or video, in order of appearance
    grids: list[tuple[int, int, int]]
    vision_kinds: list[str]  # "image" or "video", per entry of `vision`
    speech: Speech | None = None  # the Talker's targets, when the sample has them

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def condition(self) -> int:
        """The media this sample is conditioned on, as CONDITIONS bits (audio-in-video sets AUDIO_BIT too)."""
        bits = AUDIO_BIT if self.audio else 0
        bits |= IMAGE_BIT if "image" in self.vision_kinds else 0
        return bits | (VIDEO_BIT if "video" in self.vision_kinds else 0)


def _jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def decode_sample(sample: dict) -> ModelSample:
    """A shard sample (as webdataset yields it, npy and json decoded) -> model inputs."""
    info = sample["json"]
    audio, vision, grids, kinds = [], [], [], []
    for i, media in enumerate(info["media"]):
        if "audio_len" in media:
            audio.append(log_mel(decode_flac(sample[f"m{i}.flac"])))
        if media["type"] == "image":
            frames = _jpeg(sample[f"m{i}.jpg"])[None]
        elif media["type"] == "video":
            frames = np.stack([_jpeg(sample[f"m{i}.{j:04d}.jpg"]) for j in range(media["num_frames"])])
        else:
            continue
        rows, grid = patchify(frames)
        if list(grid) != media["grid_thw"]:
            raise ValueError(f"sample {info['id']}: media {i} decodes to grid {grid}, its json says {media['grid_thw']}")
        vision.append(rows)
        grids.append(grid)
        kinds.append(media["type"])
    return ModelSample(
        id=info["id"],
        input_ids=torch.from_numpy(sample["input_ids.npy"].astype(np.int64)),
        labels=torch.from_numpy(sample["labels.npy"].astype(np.int64)),
        positions=torch.from_numpy(sample["position_ids.npy"].astype(np.int64)),
        audio=audio, vision=vision, grids=grids, vision_kinds=kinds, speech=_speech(sample, info),
    )


def _speech(sample: dict, info: dict) -> Speech | None:
    if "speech.chosen.npy" not in sample:
        return None
    extra = info.get("speech", {})
    rejected = sample.get("speech.rejected.npy")
    ref = extra.get("ref_logps")
    return Speech(torch.from_numpy(sample["speech.chosen.npy"].astype(np.int64)),
                  None if rejected is None else torch.from_numpy(rejected.astype(np.int64)),
                  extra.get("speaker"), tuple(ref) if ref else None)


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack items into bins of `capacity`: longest first, each into the fullest bin it still fits (best-fit
    decreasing). Deterministic: ties go to the lower index. Returns bins of item indices in input order."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"items {too_long} are longer than the capacity {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
        else:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return [sorted(b) for b in bins]


def response_span(labels: torch.Tensor) -> tuple[int, int]:
    """(P, m) of one sample: the spoken response is the last labelled span (the last assistant turn: m text tokens
    then <|im_end|>), starting after P prompt tokens."""
    labelled = (labels != IGNORE).nonzero().flatten()
    if labelled.numel() == 0:
        raise ValueError("a Talker sample needs an assistant turn to speak; this one has no labelled token")
    end = int(labelled[-1]) + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    if end - start < 2:
        raise ValueError("the spoken response is empty (only <|im_end|>)")
    return start, end - start - 1


class Spoken(NamedTuple):
    """What the Talker objective (omni_train.model.talker) lays out from one sample of a packed batch: the sample's
    row and first position, the P prompt tokens before its spoken reply and the reply's m text tokens
    (`response_span`), and the lengths of its codec sequences (`rejected` 0 without one)."""

    row: int
    start: int
    prompt: int
    reply: int
    chosen: int
    rejected: int


def spoken(sample: ModelSample, row: int, start: int) -> Spoken:
    """The Spoken entry of `sample` placed at `start` in row `row` (no codes when it has no speech: a prompt to
    sample them for)."""
    prompt, reply = response_span(sample.labels)
    speech = sample.speech
    return Spoken(row, start, prompt, reply, len(speech.chosen) if speech else 0,
                  len(speech.rejected) if speech and speech.rejected is not None else 0)


def sample_bounds(lengths: list[int]) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens, max_length) of samples of these lengths laid end to end: int32 cumulative lengths from 0 (the
    layout of flash-attention's varlen kernels and transformers' `cu_seq_lens_q`) and the longest."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), max(lengths)


def collate_packed(rows: list[list[ModelSample]], length: int, pad_id: int) -> dict:
    """Rows of samples -> a (B, length) packed batch with (4, B, length) positions, the sample boundaries of its rows
    laid end to end (`cu_seq_lens`, `max_length`) and concatenated media; with speech, the codes (every chosen
    sequence, then every rejected one), per sample its `Spoken` entry and speaker, and the reference log-probs
    (n, 2) when every sample has them."""
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    positions = torch.zeros((4, b, length), dtype=torch.long)
    conditions = torch.zeros((b, length), dtype=torch.uint8)
    audio, vision, grids, lengths, places = [], [], [], [], []
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            places.append((s, r, start))
            end = start + len(s)
            if end > length:
                raise ValueError(f"row {r} holds {end} tokens > {length}")
            input_ids[r, start:end], labels[r, start:end] = s.input_ids, s.labels
            positions[0, r, start:end] = torch.arange(len(s))
            positions[1:, r, start:end] = s.positions
            conditions[r, start:end] = s.condition
            audio += s.audio
            vision += s.vision
            grids += s.grids
            lengths.append(len(s))
            start = end
        positions[:, r, start:] = torch.arange(length - start)  # the padding is a sample of its own
        lengths += [length - start] if start < length else []
    cu_seq_lens, max_length = sample_bounds(lengths)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "conditions": conditions,
             "cu_seq_lens": cu_seq_lens, "max_length": max_length}
    if audio:
        batch["audio_features"] = torch.cat(audio, dim=1)
        batch["audio_lengths"] = torch.tensor([a.shape[1] for a in audio], dtype=torch.long)
    if vision:
        batch["pixel_values"] = torch.cat(vision, dim=0)
        batch["grid_thw"] = torch.tensor(grids, dtype=torch.long)
    speech = [s.speech for row in rows for s in row if s.speech is not None]
    if speech:
        if len(speech) != sum(len(row) for row in rows):
            raise ValueError("a batch mixes samples with and without speech")
        no_rejected = torch.zeros(0, dtype=torch.long)
        batch["codes"] = torch.cat([s.chosen for s in speech] + [
            s.rejected if s.rejected is not None else no_rejected for s in speech])
        batch["spoken"] = [spoken(*place) for place in places]
        batch["speakers"] = [s.speaker for s in speech]
        if all(s.ref_logps for s in speech):  # else the objective refuses talker.reference=precomputed
            batch["ref_logps"] = torch.tensor([s.ref_logps for s in speech], dtype=torch.float64)
    return batch


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on the engine's device (the loader collates on the CPU, in its workers); what is not a
    tensor (the Spoken entries, speakers, max_length) stays on the host as it is."""
    return {k: host_to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without the host waiting for the device: to a GPU it is copied from pinned memory,
    asynchronously (a copy from pageable memory would first wait for every kernel queued before it); elsewhere it
    is `tensor.to(device)`."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
