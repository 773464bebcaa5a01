"""The packed attention core on the collator's sample boundaries equals the per-sample loop it replaced
(tests/helpers/attention_reference.py, boundaries read from the text positions), in outputs and gradients: on
random heads over rows of documents of many lengths, and through the tiny Thinker's loss on a batch of every sample
kind. The collator's boundaries are the text positions' own. The encoders' attention takes transformers' one call
per layer over all audio chunks and vision windows, and gives transformers' own `sdpa` outputs and gradients bit for
bit; an export's config names none of our attention functions."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface

from omni_train.data.batch import ModelSample, collate_packed, sample_bounds
from omni_train.model.kernels.attention import (ENCODER, PACKED, encoder_attention, packed_attention,
                                                use_encoder_attention, use_packed_attention, varlen_kwargs)
from omni_train.model.media import _audio, _vision
from tests.helpers.attention_reference import per_sample_attention
from tests.helpers.sp_step import fixed_batch

ROWS = [[1, 17, 5, 40, 1], [44, 1, 12, 1, 6]]  # two rows of 64 tokens; length-1 documents at row edges too
# Mel frames of audio clips: one whole 200-frame chunk, chunk tails, a 10-s clip (6 chunks), short clips; 12 chunks.
CLIPS = [200, 237, 1003, 61, 400]
# (t, h, w) patch grids: images of one and of six 8 x 8-patch windows, a video of 3 frames, the smallest image;
# 14 windows and 6 frames.
GRIDS = [(1, 4, 6), (1, 16, 20), (3, 12, 8), (1, 2, 2)]


def _heads(rows: int, length: int, heads: int, dim: int) -> torch.Tensor:
    """(rows, heads, length, dim) over a (rows, length, heads, dim) tensor, as transformers' attention layers pass
    them."""
    return torch.randn(rows, length, heads, dim, dtype=torch.float32).transpose(1, 2).requires_grad_()


def _attend(core, q, k, v, kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    out, _ = core(None, q, k, v, None, scaling=0.3, **kwargs)
    return out, torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum(), (q, k, v))


def test_the_core_equals_the_per_sample_loop_in_outputs_and_gradients_with_gqa():
    torch.manual_seed(0)
    q, k, v = _heads(2, 64, 4, 16), _heads(2, 64, 2, 16), _heads(2, 64, 2, 16)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    ours, our_grads = _attend(packed_attention, q, k, v, varlen_kwargs(*sample_bounds(sum(ROWS, []))))
    want, want_grads = _attend(per_sample_attention, q, k, v, {"position_ids": positions})
    assert ours.shape == (2, 64, 4, 16)
    assert torch.allclose(ours, want, rtol=1e-6, atol=1e-7)
    for got, expected in zip(our_grads, want_grads):
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
    # control: the same heads with each row one document differ, so the boundaries are what the core follows
    whole, _ = _attend(packed_attention, q, k, v, varlen_kwargs(*sample_bounds([64, 64])))
    assert not torch.allclose(whole, want, rtol=1e-3, atol=1e-3)


def test_the_core_without_sample_boundaries_says_what_it_needs():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="sample boundaries"):
        packed_attention(None, q, q, q, None, position_ids=torch.arange(8)[None])


def test_the_collated_boundaries_are_where_the_text_positions_restart_padding_included():
    def sample(n: int) -> ModelSample:
        ids = torch.arange(n)
        return ModelSample(f"s{n}", ids, ids, torch.arange(n).expand(3, -1), [], [], [], [])

    batch = collate_packed([[sample(3), sample(1), sample(7)], [sample(16)], [sample(1), sample(9)]], 16, pad_id=0)
    text_positions = batch["position_ids"][0].flatten()
    starts = (text_positions == 0).nonzero().flatten()
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert batch["cu_seq_lens"].tolist() == [*starts.tolist(), 48]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 4, 11, 16, 32, 33, 42, 48]  # rows 0 and 2 end in padding
    assert batch["max_length"] == 16 and isinstance(batch["max_length"], int)


def test_the_tiny_thinker_gives_the_per_sample_loops_loss_and_gradients(sample_shards):
    """Every sample kind packed into 2 rows with padding: the loss and every gradient through the new core equal
    those through the per-sample loop registered as the language model's attention."""
    from tests.test_packing import _module

    batch = fixed_batch(str(sample_shards))
    AttentionInterface.register("omni_reference_per_sample", per_sample_attention)
    results = []
    for core in (None, "omni_reference_per_sample"):  # None: the packed core the module was built with
        module = copy.deepcopy(_module())
        if core is not None:
            module.thinker.model.language_model.config._attn_implementation_internal = core
        loss, _ = module(**batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (ours, our_grads), (want, want_grads) = results
    assert torch.allclose(ours, want, rtol=1e-6, atol=0)
    assert our_grads.keys() == want_grads.keys() and len(our_grads) > 20
    for name, grad in want_grads.items():
        assert torch.allclose(our_grads[name], grad, rtol=1e-5, atol=1e-7 * float(grad.abs().max())), name


@pytest.mark.parametrize("causal", [True, False])
def test_the_varlen_kernel_call_fits_this_torchs_signature(causal):
    """The CUDA path's call, on meta tensors (torch's shape-only kernel of varlen_attn), causal (the language model)
    and bidirectional (the encoders): its arguments bind, GQA included, and it returns (tokens, heads, D). Its
    numerics are tests/gpu's."""
    from omni_train.model.kernels.attention import _varlen

    q = torch.empty(10, 4, 16, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(10, 2, 16, device="meta", dtype=torch.bfloat16)
    cu_seq_lens, max_length = sample_bounds([3, 1, 6])
    assert _varlen(q, kv, kv, cu_seq_lens.to("meta"), max_length, 0.25, causal).shape == (10, 4, 16)


@pytest.fixture(scope="module")
def thinker():
    """The tiny preset's Thinker (seed 0), fp32."""
    from omni_train.model.build import build_thinker
    from tests.helpers.models import tiny_model_config

    torch.manual_seed(0)
    return build_thinker(tiny_model_config(), None)


def _media(thinker, device: str = "cpu") -> dict:
    """Each encoder and a call of it as MediaEmbedder makes one: every clip of CLIPS, every grid of GRIDS at once."""
    tower, visual = thinker.model.audio_tower, thinker.model.visual
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(tower.config.num_mel_bins, sum(CLIPS), generator=generator).to(device)
    c = visual.config
    pixels = torch.randn(sum(t * h * w for t, h, w in GRIDS), c.in_channels * c.temporal_patch_size * c.patch_size**2,
                         generator=generator).to(device)
    clips, grids = torch.tensor(CLIPS, device=device), torch.tensor(GRIDS, device=device)
    return {"audio": (tower, lambda: _audio(tower, features, clips)),
            "vision": (visual, lambda: _vision(visual, pixels, grids))}


def _encode(encoder, run, attention: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The encoder's output and its parameters' gradients with `attention` set on its config."""
    encoder.config._attn_implementation_internal = attention
    encoder.zero_grad(set_to_none=True)
    out = run()
    (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).pow(2).sum().backward()
    return out.detach(), {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}


def _assert_bitwise_equal(ours, theirs) -> None:
    (out, grads), (want, want_grads) = ours, theirs
    assert torch.equal(out, want)
    assert grads.keys() == want_grads.keys() and len(grads) > 20
    for name, grad in want_grads.items():
        assert torch.equal(grads[name], grad), name
        assert grad.abs().sum() > 0, name  # a real gradient, not two zeros


def test_the_encoders_attend_once_per_layer_and_give_transformers_sdpa_bit_for_bit(thinker, monkeypatch):
    """The tiny preset's audio tower on 5 clips (12 chunks) and vision encoder on 3 images and a video (14 windows,
    6 frames), fp32: with the encoder attention each layer calls it once with all chunk or window boundaries, and
    outputs and every parameter gradient equal those of transformers' own per-chunk `sdpa` loop exactly."""
    use_encoder_attention(thinker)
    calls = []

    def counted(*args, cu_seq_lens_q=None, **kwargs):
        calls.append(None if cu_seq_lens_q is None else len(cu_seq_lens_q) - 1)
        return encoder_attention(*args, cu_seq_lens_q=cu_seq_lens_q, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, ENCODER, counted)
    for kind, (encoder, run) in _media(thinker).items():
        theirs = _encode(encoder, run, "sdpa")
        assert not calls
        ours = _encode(encoder, run, ENCODER)
        # audio: 2 layers over the 12 chunks; vision: a windowed block (14 windows), then a full one (6 frames)
        assert calls == {"audio": [12, 12], "vision": [14, 6]}[kind]
        calls.clear()
        _assert_bitwise_equal(ours, theirs)


def test_the_encoder_attention_called_chunk_by_chunk_is_plain_bidirectional_sdpa(thinker):
    """Under a name without "flash" transformers' encoders call the attention once per chunk or window, without
    boundaries (as a transformers routing by another test would): the encoder attention gives transformers' `sdpa`
    outputs and gradients bit for bit there too."""
    AttentionInterface.register("omni_encoder_per_chunk", encoder_attention)
    for encoder, run in _media(thinker).values():
        _assert_bitwise_equal(_encode(encoder, run, "omni_encoder_per_chunk"), _encode(encoder, run, "sdpa"))


def test_an_export_names_none_of_our_attention_functions(thinker, tmp_path):
    """The Thinker exported with our attention set on its language model and encoders (as training runs it): its
    config.json names no attention function (transformers loads it with its default), and the model keeps ours."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omni_train.model.keymap import hub_name
    from omni_train.train.export import export_pretrained

    use_encoder_attention(thinker)
    use_packed_attention(thinker.model.language_model)
    out = export_pretrained(thinker, tmp_path / "export", rename=hub_name)
    saved = (out / "config.json").read_text()
    assert ENCODER not in saved and PACKED not in saved and "flash" not in saved and "attn_implementation" not in saved
    loaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out).model
    for model, names in ((loaded, ("sdpa",) * 3), (thinker.model, (ENCODER, ENCODER, PACKED))):
        assert (model.audio_tower.config._attn_implementation, model.visual.config._attn_implementation,
                model.language_model.config._attn_implementation) == names
