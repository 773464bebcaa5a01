"""Loader-side features equal transformers' own front ends: WhisperFeatureExtractor's log-mel (without its 30-s
padding) and Qwen2-VL's image patches; video patches follow the layout the vision encoder's Conv3d expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor

from omni_train.data.features import log_mel, patchify


def _clip(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    t = np.arange(n) / 16_000
    # Loudest at the very end, so the dynamic-range floor depends on the last frames.
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.linspace(0, 1, n) + 0.01 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 161, 16_000, 16_001, 47_999, 123_457, 479_800])
def test_log_mel_equals_whisper_feature_extractor_on_valid_frames(n):
    extractor = WhisperFeatureExtractor(feature_size=128)  # Qwen2.5-Omni: 128 bins, n_fft 400, hop 160
    out = extractor(_clip(n), sampling_rate=16_000, return_attention_mask=True, padding="max_length",
                    return_tensors="np")
    valid = int(out["attention_mask"].sum())
    ours = log_mel(_clip(n))
    assert ours.shape == (128, valid)
    np.testing.assert_allclose(ours.numpy(), out["input_features"][0][:, :valid], atol=1e-4, rtol=0)


def test_log_mel_of_a_45_s_clip_is_not_cut_at_30_s():
    n = 45 * 16_000
    wave = _clip(n)
    # The extractor configured for 300-s inputs (as Qwen2.5-Omni's processor allows) as the reference.
    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=300)
    out = extractor(wave, sampling_rate=16_000, return_attention_mask=True, padding="max_length", return_tensors="np")
    ours = log_mel(wave)
    assert ours.shape == (128, 4500)
    np.testing.assert_allclose(ours.numpy(), out["input_features"][0][:, :4500], atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(56, 56), (112, 336), (280, 196)])
def test_image_patches_equal_qwen2vl_image_processor(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    pixels = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    reference = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)(
        images=[Image.fromarray(pixels)], return_tensors="np")
    rows, grid = patchify(pixels[None])
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(rows.numpy(), reference["pixel_values"], atol=1e-6, rtol=0)


def test_video_patch_rows_hold_the_pixels_the_conv3d_embedding_expects():
    """Row order: temporal step, then 2x2 merge blocks row-major, then the 4 patches of a block row-major; a row is
    (C, 2 frames, 14, 14) of the normalised frames."""
    frames = np.random.default_rng(0).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    rows, grid = patchify(frames)
    assert grid == (2, 4, 6)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    norm = ((torch.from_numpy(frames).float() / 255 - mean) / std).permute(3, 0, 1, 2)  # C, T, H, W
    row = 0
    for t in range(2):
        for bh in range(2):
            for bw in range(3):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                        want = norm[:, 2 * t:2 * t + 2, y:y + 14, x:x + 14].reshape(-1)
                        torch.testing.assert_close(rows[row], want, atol=1e-6, rtol=0)
                        row += 1
    assert row == rows.shape[0]
