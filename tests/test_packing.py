"""Packing proof on the tiny model (fp32): our media merge equals transformers' Thinker forward (with its own SDPA
attention), and a packed batch through our per-sample attention core gives the same loss and gradients as its
samples run one at a time."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from omegaconf import OmegaConf

from omni_train.model.kernels.attention import use_packed_attention
from omni_train.data.batch import best_fit, collate_packed, decode_sample
from omni_train.config.schema import ModelConfig
from omni_train.model.build import build_thinker
from omni_train.model.thinker import ThinkerLM
from tests.conftest import REPO

KINDS = ("speech-", "image-", "video-000", "video-001", "mixed-", "text-")


@functools.cache
def _module() -> ThinkerLM:
    preset = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    torch.manual_seed(0)
    thinker = build_thinker(ModelConfig(preset="tiny", hf_config=OmegaConf.to_container(preset.hf_config)), None)
    use_packed_attention(thinker.model.language_model)  # as training runs it
    return ThinkerLM(thinker)


@contextlib.contextmanager
def _transformers_attention(module: ThinkerLM):
    config = module.thinker.model.language_model.config
    ours = config._attn_implementation
    config._attn_implementation_internal = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation_internal = ours


@pytest.fixture(scope="module")
def samples(sample_shards):
    """One decoded sample of each kind: speech, image, video with its audio, video without, image+audio, text."""
    picked = {}
    urls = [str(p) for p in sorted(sample_shards.glob("shard-*.tar"))]
    for raw in wds.WebDataset(urls, shardshuffle=False).decode():
        kind = next((k for k in KINDS if raw["json"]["id"].startswith(k)), None)
        if kind and kind not in picked:
            picked[kind] = decode_sample(raw)
    assert sorted(picked) == sorted(KINDS)
    return [picked[k] for k in KINDS]


def _transformers_loss_sum(module: ThinkerLM, s) -> torch.Tensor:
    """The same sample through transformers' own Thinker forward (its own merge and get_rope_index)."""
    kwargs = {}
    if s.audio:
        frames = max(a.shape[1] for a in s.audio)
        feats = torch.zeros(len(s.audio), 128, frames)
        mask = torch.zeros(len(s.audio), frames, dtype=torch.long)
        for i, a in enumerate(s.audio):
            feats[i, :, : a.shape[1]], mask[i, : a.shape[1]] = a, 1
        kwargs.update(input_features=feats, feature_attention_mask=mask)
    ids = s.input_ids[None]
    images = [(v, g) for v, g, k in zip(s.vision, s.grids, s.vision_kinds) if k == "image"]
    videos = [(v, g) for v, g, k in zip(s.vision, s.grids, s.vision_kinds) if k == "video"]
    if images:
        kwargs.update(pixel_values=torch.cat([v for v, _ in images]), image_grid_thw=torch.tensor([g for _, g in images]))
    if videos:
        kwargs.update(pixel_values_videos=torch.cat([v for v, _ in videos]),
                      video_grid_thw=torch.tensor([g for _, g in videos]),
                      video_second_per_grid=torch.tensor([1.0] * len(videos)))
    # In the corpus a video's audio rides with it exactly when the video block opens with <|audio_bos|>.
    use_audio_in_video = bool(videos) and bool(((ids[0, :-1] == 151652) & (ids[0, 1:] == 151647)).any())
    with _transformers_attention(module):
        out = module.thinker(input_ids=ids, attention_mask=torch.ones_like(ids),
                             use_audio_in_video=use_audio_in_video, **kwargs)
    targets = s.labels[None, 1:]
    keep = targets != -100
    return F.cross_entropy(out.logits[:, :-1][keep].float(), targets[keep], reduction="sum")


def _ours(module: ThinkerLM, rows, length) -> torch.Tensor:
    return module(**collate_packed(rows, length, pad_id=151643))[0]


def test_our_media_merge_equals_transformers_thinker_forward(samples):
    module = _module()
    for s in samples:
        length = -(-len(s) // 8) * 8
        ours = _ours(module, [[s]], length)
        theirs = _transformers_loss_sum(module, s)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=s.id)


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def test_packed_batch_has_the_same_loss_and_gradients_as_its_samples_one_by_one(samples):
    module = _module()
    module.zero_grad()
    separate = sum(_ours(module, [[s]], -(-len(s) // 8) * 8) for s in samples)
    separate.backward()
    want = _grads(module)

    module.zero_grad()
    bins = best_fit([len(s) for s in samples], capacity=1024)
    rows = [[samples[i] for i in b] for b in bins]
    assert len(rows) < len(samples), "the samples should share rows"
    packed = _ours(module, rows, 1024)
    packed.backward()
    got = _grads(module)

    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)
    assert want.keys() == got.keys()
    for name in want:
        # fp32 sums in another order: agree to 1e-5 of each gradient tensor's own scale.
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5 * scale + 1e-8, msg=name)


def test_best_fit_packs_tightly_and_never_splits_a_sample():
    lengths = [700, 300, 500, 500, 200, 100, 1000, 24]
    bins = best_fit(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert len(bins) == 4  # 3324 tokens need at least 4 rows of 1024
    with pytest.raises(ValueError, match="longer than the capacity"):
        best_fit([2000], 1024)


def test_per_condition_stats_attribute_each_samples_loss_to_the_media_it_holds(samples):
    from omni_train.data.batch import AUDIO_BIT, CONDITIONS, IMAGE_BIT, VIDEO_BIT

    # speech, image, video with its audio, video without, image + speech, text (KINDS order)
    assert [s.condition for s in samples] == [AUDIO_BIT, IMAGE_BIT, AUDIO_BIT | VIDEO_BIT, VIDEO_BIT,
                                              IMAGE_BIT | AUDIO_BIT, 0]
    module = _module()
    with torch.no_grad():
        alone = [float(_ours(module, [[s]], -(-len(s) // 8) * 8)) for s in samples]
        _, stats = module(**collate_packed([samples], -(-sum(len(s) for s in samples) // 8) * 8, pad_id=151643))
    labels = [int((s.labels[1:] != -100).sum()) for s in samples]
    for i, bit in enumerate(CONDITIONS.values()):
        members = [k for k, s in enumerate(samples) if (s.condition == 0 if bit == 0 else s.condition & bit)]
        assert members
        assert stats[1, i] == sum(labels[k] for k in members)
        assert float(stats[0, i]) == pytest.approx(sum(alone[k] for k in members), rel=1e-5)
