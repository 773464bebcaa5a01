"""Qwen2.5-Omni's token layout for media, and TMRoPE position ids: what transformers' processor and
`get_rope_index` compute, in one pass over the tokens.

Owns:
- placeholder counts from media sizes (audio: 16 kHz samples -> mel frames -> two stride-2 steps; image and video:
  grid_thw / merge^2);
- expanding the single placeholders of the ChatML text (`<|AUDIO|>`, `<|IMAGE|>`, `<|VIDEO|>`) into their token
  runs, video and its audio interleaved in 2-s chunks under `use_audio_in_video`;
- TMRoPE positions, 3 x L: text one running id on all axes; audio one id per 40-ms token; images and videos
  t (25 ids per second of video), h, w over the merged grid; every segment starts one past the largest id of the
  piece placed before it (transformers' rule, including its quirk for audio-in-video: the closing pair follows
  the last interleaved chunk, not the largest id of the block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omni_train.tokens import AUDIO, AUDIO_BOS, AUDIO_EOS, IMAGE, VIDEO

# The one home of the media arithmetic (data_prep.media sizes media by it, omni_train.data.features computes by it):
# 16 kHz audio, one mel frame per 160-sample hop; 14-px patches, 2 frames per temporal patch, 2 x 2 patches merged
# into one token.
SAMPLE_RATE = 16_000
HOP = 160
PATCH = 14
TEMPORAL_PATCH = 2
MERGE = 2
POSITIONS_PER_SECOND = 25
SECONDS_PER_CHUNK = 2


def mel_frames(num_samples: int) -> int:
    """Valid mel frames of a clip: WhisperFeatureExtractor marks one frame per started 160-sample hop."""
    return -(-num_samples // HOP)


def audio_tokens(num_samples: int) -> int:
    """Audio encoder output length: conv stride 2, then average pooling stride 2 (one token per 40 ms)."""
    frames = mel_frames(num_samples)
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass(frozen=True)
class Media:
    """One media item in order of appearance. `audio_samples` is the clip (audio) or the video's own track
    (video under use_audio_in_video); `grid_thw` is the vision grid in 14-px patches; `second_per_grid` the
    seconds one temporal grid step spans (temporal patch 2 / fps)."""

    type: str
    audio_samples: int = 0
    grid_thw: tuple[int, int, int] = (0, 0, 0)
    second_per_grid: float = 1.0

    @property
    def vision_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (MERGE * MERGE)


def _vision_positions(media: Media, start: int) -> np.ndarray:
    """3 x N positions of an image's or video's merged tokens, row-major per temporal step."""
    t, h, w = media.grid_thw[0], media.grid_thw[1] // MERGE, media.grid_thw[2] // MERGE
    seconds = 1.0 if media.type == "image" else media.second_per_grid
    # float32 then truncation, as torch computes `(arange(t) * second_per_grid * 25).long()`.
    t_ids = (np.arange(t, dtype=np.float32) * np.float32(seconds) * np.float32(POSITIONS_PER_SECOND)).astype(np.int64)
    tt = np.repeat(t_ids, h * w)
    hh = np.tile(np.repeat(np.arange(h), w), t)
    ww = np.tile(np.arange(w), t * h)
    return np.stack([tt, hh, ww]) + start


def _chunks(temporal: np.ndarray, start: int) -> list[tuple[int, int]]:
    """Split a run of tokens by their temporal id into 2-s chunks: [start, start+50), [start+50, ...), ...
    (an empty chunk is emitted where the ids jump over a whole chunk, as transformers does)."""
    per_chunk = POSITIONS_PER_SECOND * SECONDS_PER_CHUNK
    bounds, begin, chunk = [], 0, 1
    for i, value in enumerate(temporal):
        if value - start >= chunk * per_chunk:
            bounds.append((begin, i))
            begin, chunk = i, chunk + 1
    bounds.append((begin, len(temporal)))
    return bounds


class _Builder:
    """Accumulates token runs and their positions; `next_id` is one past the largest id of the last piece."""

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.sources: list[np.ndarray] = []
        self.source = 0  # index of the input token being expanded
        self.next_id = 0

    def place(self, token_ids: np.ndarray, positions: np.ndarray) -> None:
        self.ids.append(np.asarray(token_ids, dtype=np.int64))
        self.positions.append(positions)
        self.sources.append(np.full(len(self.ids[-1]), self.source, dtype=np.int64))
        if positions.size:
            self.next_id = int(positions.max()) + 1

    def running(self, token_ids) -> None:
        token_ids = np.asarray(token_ids, dtype=np.int64)
        self.place(token_ids, np.broadcast_to(np.arange(len(token_ids)) + self.next_id, (3, len(token_ids))))

    def interleaved(self, item: Media) -> None:
        """The `<|vision_bos|>` before is placed; add `<|audio_bos|>` at its id, the 2-s chunks V0 A0 V1 A1 ...,
        and `<|audio_eos|>`, leaving `next_id` so that the text's `<|vision_eos|>` shares its id."""
        bos = self.next_id - 1
        self.place(np.array([AUDIO_BOS]), np.full((3, 1), bos, dtype=np.int64))
        start = bos + 1
        video = _vision_positions(item, start)
        n_audio = audio_tokens(item.audio_samples)
        audio = np.broadcast_to(np.arange(n_audio) + start, (3, n_audio))
        v_chunks, a_chunks = _chunks(video[0], start), _chunks(audio[0], start)
        for j in range(max(len(v_chunks), len(a_chunks))):
            if j < len(v_chunks):
                lo, hi = v_chunks[j]
                self.place(np.full(hi - lo, VIDEO), video[:, lo:hi])
            if j < len(a_chunks):
                lo, hi = a_chunks[j]
                self.place(np.full(hi - lo, AUDIO), audio[:, lo:hi])
        self.running([AUDIO_EOS])
        self.next_id -= 1


def expand(ids: np.ndarray, media: list[Media], use_audio_in_video: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expand single placeholders in `ids` and compute TMRoPE positions.

    `ids` is the tokenized ChatML text where each media item appears as `<|audio_bos|><|AUDIO|><|audio_eos|>`,
    `<|vision_bos|><|IMAGE|><|vision_eos|>` or `<|vision_bos|><|VIDEO|><|vision_eos|>` (under use_audio_in_video a
    video stands for itself and its audio track). Returns (input_ids, position_ids 3 x L, source), where
    source[i] is the index in `ids` of the token that output token i came from (to carry labels over).
    """
    expected = {AUDIO: "audio", IMAGE: "image", VIDEO: "video"}
    out = _Builder()
    queue = iter(media)
    for index, token in enumerate(ids.tolist()):
        out.source = index
        if token not in expected:
            out.running([token])
            continue
        item = next(queue, None)
        if item is None or item.type != expected[token]:
            found = "nothing" if item is None else f"a {item.type} item"
            raise ValueError(f"placeholder for {expected[token]} met {found}: media list and text disagree")
        if token == AUDIO:
            out.running(np.full(audio_tokens(item.audio_samples), AUDIO))
        elif token == VIDEO and use_audio_in_video:
            out.interleaved(item)
        else:
            out.place(np.full(item.vision_tokens, token), _vision_positions(item, out.next_id))
    if next(queue, None) is not None:
        raise ValueError("more media items than placeholders in the text")
    input_ids = np.concatenate(out.ids)
    positions = np.concatenate(out.positions, axis=1).astype(np.int64)
    return input_ids, positions, np.concatenate(out.sources)
