"""Token expansion and TMRoPE positions equal what transformers' own Qwen2.5-Omni code computes.

Oracles: `Qwen2_5OmniProcessor`'s placeholder replacement methods (for input_ids), the Thinker's
`get_rope_index` (for positions) and `WhisperFeatureExtractor` (for valid mel frames), called directly.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from data_prep.layout import (
    AUDIO,
    IMAGE,
    VIDEO,
    Media,
    audio_tokens,
    expand,
    mel_frames,
)
from omni_train.tokenizer import load_tokenizer
from tests.oracle import transformers_layout

A, I, V = "<|audio_bos|><|AUDIO|><|audio_eos|>", "<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_bos|><|VIDEO|><|vision_eos|>"


def chat(*user_parts: str, reply: str = "Sure.") -> str:
    return f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{''.join(user_parts)}<|im_end|>\n" \
           f"<|im_start|>assistant\n{reply}<|im_end|>\n"


LAYOUTS = {
    "text_only": (chat("Hello there, 12 apples?"), [], False),
    "multi_turn": (chat("Hi") + chat("Again", reply="Yes, again."), [], False),
    "audio_only_odd_length": (chat(A, "What was said?"), [Media("audio", audio_samples=16_001)], False),
    "several_audios": (chat(A, " and ", A), [Media("audio", audio_samples=48_123),
                                               Media("audio", audio_samples=161)], False),
    "several_images": (chat(I, "compare", I), [Media("image", grid_thw=(1, 6, 8)),
                                                 Media("image", grid_thw=(1, 10, 4))], False),
    "video_without_audio": (chat(V, "Describe."), [Media("video", grid_thw=(5, 4, 6), second_per_grid=1.0)], False),
    "video_at_1_5_fps": (chat(V), [Media("video", grid_thw=(6, 4, 4), second_per_grid=2 / 1.5)], False),
    "audio_in_video_audio_longer": (chat(V, "What happens?"),
                                    [Media("video", audio_samples=5 * 16_000 + 77, grid_thw=(3, 4, 4))], True),
    "audio_in_video_video_longer": (chat(V), [Media("video", audio_samples=2 * 16_000 + 5, grid_thw=(4, 4, 6))], True),
    "mixture": (chat(I, "then", A, "then", V, "end"),
                [Media("image", grid_thw=(1, 4, 4)), Media("audio", audio_samples=30_000),
                 Media("video", audio_samples=3 * 16_000, grid_thw=(3, 4, 4))], True),
    "mixture_no_audio_in_video": (chat(V, A, I), [Media("video", grid_thw=(2, 8, 4)),
                                                 Media("audio", audio_samples=9_999), Media("image", grid_thw=(1, 4, 6))],
                                  False),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_expansion_and_positions_equal_transformers(name):
    text, media, use_audio_in_video = LAYOUTS[name]
    tok = load_tokenizer()
    text_ids = np.array(tok(text, add_special_tokens=False).input_ids)
    ids, positions, source = expand(text_ids, media, use_audio_in_video)
    want_ids, want_positions = transformers_layout(text, media, use_audio_in_video)
    assert ids.tolist() == want_ids.tolist()
    assert positions.shape == (3, len(ids))
    assert positions.tolist() == want_positions.tolist()
    # Every output token traces back to its input token: text to itself, expansions to their placeholder.
    assert (np.diff(source) >= 0).all()
    from_text = text_ids[source] == ids
    assert np.isin(text_ids[source[~from_text]], (AUDIO, IMAGE, VIDEO)).all()


def test_spec_probe_audio_in_video_positions():
    """4 temporal grids of 2x2 merged tokens + 100 audio tokens: bos pair at 2, video t = 3, 28, 53, 78, audio
    3..102, eos pair at 103, text from 104."""
    ids = np.array([100, 101, 151652, VIDEO, 151653, 102])
    samples = next(s for s in range(0, 200_000, 160) if audio_tokens(s) == 100)
    out, pos, _ = expand(ids, [Media("video", audio_samples=samples, grid_thw=(4, 4, 4))], True)
    assert pos[:, 2:4].T.tolist() == [[2, 2, 2]] * 2
    assert sorted(set(pos[0, out == VIDEO].tolist())) == [3, 28, 53, 78]
    assert pos[0, out == AUDIO].tolist() == list(range(3, 103))
    assert pos[:, -3:-1].T.tolist() == [[103, 103, 103]] * 2 and pos[:, -1].tolist() == [104] * 3


@pytest.mark.parametrize("samples", [1, 159, 160, 161, 16_000, 16_001, 47_999, 480_000])
def test_mel_frames_equal_whisper_feature_extractor_valid_frames(samples):
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16_000, hop_length=160, n_fft=400)
    wave = np.random.default_rng(samples).standard_normal(samples).astype(np.float32)
    mask = fe(wave, sampling_rate=16_000, return_attention_mask=True, padding="max_length")["attention_mask"]
    assert mel_frames(samples) == int(mask.sum())
