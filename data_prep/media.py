"""Media decoding and sizing, once, at preparation time.

Owns: audio -> 16 kHz mono float32 (PyAV's resampler, any container FFmpeg reads); images -> RGB resized by Qwen's
smart-resize rule; videos -> frames sampled at the configured fps (qwen-omni-utils' rule: min 4, max 768, an even
count, linspace with rounding), resized under the per-frame and total pixel budgets, plus the video's own audio
track; and compact encodings for shards (FLAC for audio, JPEG for images and frames, at their final size).
Anything that cannot be decoded, or is silent, raises `MediaError` with the reason.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_prep.chatml import SampleError
from data_prep.layout import MERGE, PATCH, SAMPLE_RATE, TEMPORAL_PATCH

PATCH_FACTOR = PATCH * MERGE  # sides are multiples of one merged token (28 px)
FRAME_FACTOR = TEMPORAL_PATCH


class MediaError(SampleError):
    """A media file that cannot become part of a sample."""


@dataclass
class VisionBudget:
    """Qwen2.5-Omni's defaults: images 4..16384 merged tokens, video frames 128..768 merged tokens each and about
    128000 x 0.9 in total, sampled at 2 fps (4..768 frames, an even count)."""

    # An image is resized to at least this many pixels (4 merged tokens).
    image_min_pixels: int = 4 * 28 * 28
    # An image is resized to at most this many pixels (16,384 merged tokens).
    image_max_pixels: int = 16384 * 28 * 28
    # A video frame gets at least this many pixels (128 merged tokens).
    video_min_pixels: int = 128 * 28 * 28
    # A video frame gets at most this many pixels (768 merged tokens).
    video_max_pixels: int = 768 * 28 * 28
    # All of a video's frames together get at most this many pixels (the processor's 0.9 x 128,000 tokens).
    video_total_pixels: int = int(128000 * 28 * 28 * 0.9)
    # Frames sampled per second of video.
    fps: float = 2.0
    # Fewest frames sampled from a video.
    min_frames: int = 4
    # Most frames sampled from a video.
    max_frames: int = 768


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = PATCH_FACTOR):
    """The (height, width) closest to the input's aspect ratio with both sides multiples of `factor` and the area
    within [min_pixels, max_pixels] (Qwen2-VL's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 exceeds 200:1")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def load_image(path: str, budget: VisionBudget) -> Image.Image:
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise MediaError(f"cannot decode image {path}: {e}") from None
    h, w = smart_resize(image.height, image.width, budget.image_min_pixels, budget.image_max_pixels)
    return image.resize((w, h), Image.Resampling.BICUBIC)


def _resample_to_mono_16k(container, stream) -> np.ndarray:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    for frame in container.decode(stream):
        frame.pts = None  # let the resampler run on sample counts, not on (possibly irregular) timestamps
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def _check_audible(wave: np.ndarray, what: str, min_rms: float = 1e-4) -> np.ndarray:
    if wave.size == 0:
        raise MediaError(f"{what} has no audio samples")
    if float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) < min_rms:
        raise MediaError(f"{what} is silent (RMS below {min_rms})")
    return wave


def load_audio(path: str, max_seconds: float) -> np.ndarray:
    """16 kHz mono float32 samples of an audio file. Longer than `max_seconds` is an error, never a cut."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise MediaError(f"{path} has no audio stream")
            wave = _resample_to_mono_16k(container, container.streams.audio[0])
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot decode audio {path}: {e}") from None
    if wave.size > max_seconds * SAMPLE_RATE:
        raise MediaError(f"audio {path} lasts {wave.size / SAMPLE_RATE:.1f} s > max_audio_seconds={max_seconds}")
    return _check_audible(wave, f"audio {path}")


def frame_indices(total_frames: int, video_fps: float, budget: VisionBudget) -> np.ndarray:
    """Which decoded frames to keep: qwen-omni-utils' `smart_nframes` then linspace with rounding."""
    min_frames = math.ceil(budget.min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(budget.max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    wanted = total_frames / video_fps * budget.fps
    n = math.floor(min(max(wanted, min_frames), max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise MediaError(f"video has {total_frames} frames: too few to sample {FRAME_FACTOR} or more")
    import torch

    # torch's own float32 linspace and rounding: numpy's linspace rounds differently for long videos.
    return torch.linspace(0, total_frames - 1, n).round().long().numpy()


@dataclass
class Video:
    frames: list[Image.Image]  # resized, an even count
    audio: np.ndarray | None  # 16 kHz mono track, when requested and present
    second_per_grid: float


def load_video(path: str, budget: VisionBudget, with_audio: bool, max_audio_seconds: float) -> Video:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            decoded = [f.to_image() for f in container.decode(stream)]
            video_fps = float(stream.average_rate or stream.guessed_rate or 0)
        audio = None
        if with_audio:
            if hasattr(path, "seek"):
                path.seek(0)
            with av.open(path) as container:
                if not container.streams.audio:
                    raise MediaError(f"{path} has no audio track, but use_audio_in_video is set")
                audio = _resample_to_mono_16k(container, container.streams.audio[0])
            _check_audible(audio, f"audio track of {path}")
            if audio.size > max_audio_seconds * SAMPLE_RATE:
                raise MediaError(f"audio track of {path} lasts {audio.size / SAMPLE_RATE:.1f} s > max_audio_seconds")
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot decode video {path}: {e}") from None
    if not decoded or video_fps <= 0:
        raise MediaError(f"video {path} has no decodable frames or no frame rate")
    picked = [decoded[i] for i in frame_indices(len(decoded), video_fps, budget)]
    max_pixels = max(min(budget.video_max_pixels, budget.video_total_pixels / len(picked) * FRAME_FACTOR),
                     int(budget.video_min_pixels * 1.05))
    h, w = smart_resize(picked[0].height, picked[0].width, budget.video_min_pixels, max_pixels)
    frames = [f.convert("RGB").resize((w, h), Image.Resampling.BICUBIC) for f in picked]
    # transformers' processor: second_per_grid = temporal_patch_size / fps (the configured fps).
    return Video(frames, audio, FRAME_FACTOR / budget.fps)


def grid_thw(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The vision grid in 14-px patches; a single image counts as 2 frames (temporal patch 2)."""
    return max(frames, FRAME_FACTOR) // FRAME_FACTOR, height // PATCH, width // PATCH


def encode_flac(wave: np.ndarray) -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> np.ndarray:
    import soundfile

    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    if rate != SAMPLE_RATE:
        raise MediaError(f"FLAC at {rate} Hz, expected {SAMPLE_RATE}")
    return wave


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # No chroma subsampling: the patches keep their colour resolution.
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()
