"""Model inputs from shard media, computed in loader workers: log-mel features and vision patches.

Owns:
- `log_mel`: 128-bin log-mel of a 16 kHz clip, equal to transformers' WhisperFeatureExtractor as Qwen2.5-Omni
  configures it (n_fft 400, hop 160, Slaney mel, log10, 8-dB dynamic range, (x + 4) / 4) on its valid frames, but
  computed on the clip alone: no padding to 30 s, no cut at 30 s. The extractor pads with zeros before its STFT, so
  frames near the end of a clip see zeros, and its dynamic-range floor uses the maximum over every frame that
  touches the signal; both are reproduced. (One edge differs by design: a clip ending less than 200 samples before
  the extractor's fixed buffer end, where its STFT mirrors signal instead of zeros into the last frame.)
- `patchify`: frames at their final size -> rows of 3 x 2 x 14 x 14 normalised pixels in the order the vision
  encoder's Conv3d patch embedding and 2 x 2 merger expect (Qwen2-VL's image processor layout), plus grid_thw.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from data_prep.layout import HOP, MERGE, PATCH, SAMPLE_RATE, TEMPORAL_PATCH, mel_frames

N_FFT, N_MELS = 400, 128
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.cache
def _mel_filters() -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=N_MELS, min_frequency=0.0,
                              max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(filters).to(torch.float32)


def log_mel(wave: np.ndarray) -> torch.Tensor:
    """(128, ceil(len / 160)) float32 features of a mono 16 kHz clip."""
    n = len(wave)
    valid = mel_frames(n)
    # Zero tail long enough that every frame whose window reaches a signal sample is computed.
    padded = torch.zeros(n + N_FFT, dtype=torch.float32)
    padded[:n] = torch.from_numpy(np.asarray(wave, dtype=np.float32))
    stft = torch.stft(padded, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    touching = min(stft.shape[-1], (n + N_FFT // 2 - 1) // HOP + 1)
    spectrum = torch.view_as_real(stft[..., :touching])
    power = spectrum.square().sum(-1)  # |z|^2 without the square root that abs() takes
    log_spec = torch.clamp(_mel_filters().T @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0)[:, :valid].contiguous()


def patchify(frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Frames (T, H, W, 3) uint8, H and W multiples of 28, T even or 1 (an image, repeated to 2 frames) ->
    (grid_t * grid_h * grid_w, 1176) float32 rows and grid_thw."""
    x = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2)  # T, C, H, W uint8
    t, c, h, w = x.shape
    if (t != 1 and t % TEMPORAL_PATCH) or h % (PATCH * MERGE) or w % (PATCH * MERGE):
        raise ValueError(f"frames of shape {tuple(frames.shape)}: need an even count and sides multiple of 28")
    # (x / 255 - mean) / std as one multiply-add, on the distinct frames only (an image is repeated afterwards).
    scale = (1 / (255 * torch.tensor(CLIP_STD))).view(1, 3, 1, 1)
    shift = (torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(1, 3, 1, 1)
    x = torch.addcmul(-shift, x.to(torch.float32), scale)
    if t == 1:
        x, t = x.expand(TEMPORAL_PATCH, -1, -1, -1), TEMPORAL_PATCH
    gt, gh, gw = t // TEMPORAL_PATCH, h // PATCH, w // PATCH
    x = x.reshape(gt, TEMPORAL_PATCH, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    # -> (t, h-block, w-block, h-in-block, w-in-block, C, temporal, patch_h, patch_w)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * TEMPORAL_PATCH * PATCH * PATCH).contiguous(), (gt, gh, gw)
