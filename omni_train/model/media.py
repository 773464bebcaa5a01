"""Media into the Thinker's input embeddings, ZeRO-3-safely: what the Thinker and the Talker objectives share.

Owns `MediaEmbedder`. Media embeddings are computed here, not in transformers' `Qwen2_5OmniThinkerModel.forward`,
for one reason: under ZeRO-3 every rank must issue the same parameter gathers every micro-batch. So the audio
encoder runs exactly once per micro-batch on all clips together, and the vision encoder exactly once on all images
and videos together (transformers' forward calls the vision encoder twice when a batch has both); a micro-batch
without audio (or without pixels) feeds the encoder a dummy input whose output enters the loss multiplied by zero.
In transformers 5.24 both encoders are batched inside (each submodule runs once per call, whatever the number of
clips or images), so the gathers do not depend on the data. (DeepSpeed's `set_z3_leaf_modules` would also decouple
them, but on its CPU accelerator ZeRO-3's `zero_grad` then fails calling `record_stream` on CPU grads.) The merge
itself is transformers' (placeholder positions filled in order).

With sequence parallelism (`sp`, omni_train.model.kernels.attention.SequenceParallel) the ranks of a group share the
row's media out between them for the encoders (see `_encode`) and all-gather the encoder outputs, so every rank
embeds the whole row.
"""

from __future__ import annotations

import torch

from omni_train.tokens import AUDIO, IMAGE, VIDEO

# The smallest inputs each encoder accepts: a 1-s silent clip (100 mel frames -> 25 tokens) and one 28 x 28 image.
DUMMY_MEL_FRAMES = 100
DUMMY_GRID = (1, 2, 2)


class MediaEmbedder:
    """Input embeddings of transformers' Qwen2.5-Omni Thinker (`thinker`) with media filled in. Holds no parameters
    of its own: the objective that holds it owns the Thinker (and its parameter names, `thinker.`)."""

    def __init__(self, thinker, sp=None):
        self.thinker, self.sp = thinker, sp

    def __call__(self, input_ids, audio_features=None, audio_lengths=None, pixel_values=None,
                 grid_thw=None) -> torch.Tensor:
        """The input embeddings of a packed batch with every media placeholder filled by its encoder's output."""
        model = self.thinker.model
        embeds = model.get_input_embeddings()(input_ids)
        tower, visual = model.audio_tower, model.visual
        if audio_features is None:
            embeds = _fill(embeds, None, _dummy_audio(tower, embeds))
        else:
            clips = audio_features.split(audio_lengths.tolist(), dim=1)

            def run_audio(idx: list[int]) -> torch.Tensor:
                return _audio(tower, torch.cat([clips[i] for i in idx], dim=1), audio_lengths[idx])

            tokens = tower._get_feat_extract_output_lengths(audio_lengths)[1].tolist()
            out = self._encode(tokens, run_audio, lambda: _dummy_audio(tower, embeds))
            embeds = _fill(embeds, input_ids == AUDIO, out)
        if pixel_values is None:
            return _fill(embeds, None, _dummy_vision(visual, embeds))
        rows = grid_thw.prod(dim=1)
        items = pixel_values.split(rows.tolist())

        def run_vision(idx: list[int]) -> torch.Tensor:
            return _vision(visual, torch.cat([items[i] for i in idx]), grid_thw[idx])

        tokens = (rows // visual.spatial_merge_size**2).tolist()
        out = self._encode(tokens, run_vision, lambda: _dummy_vision(visual, embeds))
        return _fill(embeds, (input_ids == IMAGE) | (input_ids == VIDEO), out)

    def _encode(self, tokens: list[int], run, dummy) -> torch.Tensor:
        """Encoder outputs of every item (clip, image or video; `tokens` output rows each), in order.

        Without sequence parallelism: one call `run(all items)`. With it, the items are shared out over the group
        (largest first to the least loaded rank: the same plan on every rank), each rank encodes its share in one
        call (a zero-weight `dummy()` when it has none, so every rank gathers the encoder's parameters once), and
        the outputs are all-gathered with autograd: each item's gradient flows back to the rank that encoded it,
        and no rank holds the activations of the whole row's media."""
        everything = list(range(len(tokens)))
        if self.sp is None:
            return run(everything)
        plan = _share(tokens, self.sp.degree)
        mine = plan[self.sp.rank]
        if mine:
            local = run(mine)
        else:
            probe = dummy()
            local = probe[:0] + 0.0 * probe.sum()
        gathered = self.sp.gather_rows(local, [sum(tokens[i] for i in share) for share in plan])
        by_item: dict[int, torch.Tensor] = {}
        for share, part in zip(plan, gathered):
            by_item.update(zip(share, part.split([tokens[i] for i in share])))
        return torch.cat([by_item[i] for i in everything])


def _audio(tower, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    after_cnn, _ = tower._get_feat_extract_output_lengths(lengths)
    return tower(features.to(tower.conv1.weight.dtype), feature_lens=lengths, aftercnn_lens=after_cnn).last_hidden_state


def _vision(visual, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    return visual(pixels.to(visual.patch_embed.proj.weight.dtype), grid_thw=grid_thw).pooler_output


def _dummy_audio(tower, like: torch.Tensor) -> torch.Tensor:
    """The audio encoder on a 1-s silent clip: for ranks or micro-batches without audio."""
    features = like.new_zeros(tower.config.num_mel_bins, DUMMY_MEL_FRAMES, dtype=torch.float32)
    return _audio(tower, features, torch.tensor([DUMMY_MEL_FRAMES], device=like.device))


def _dummy_vision(visual, like: torch.Tensor) -> torch.Tensor:
    """The vision encoder on one black 28 x 28 image: for ranks or micro-batches without pixels."""
    c = visual.config
    pixels = like.new_zeros(DUMMY_GRID[0] * DUMMY_GRID[1] * DUMMY_GRID[2],
                            c.in_channels * c.temporal_patch_size * c.patch_size**2, dtype=torch.float32)
    return _vision(visual, pixels, torch.tensor([DUMMY_GRID], device=like.device))


def _share(sizes: list[int], ranks: int) -> list[list[int]]:
    """Item indices per rank: largest first to the least loaded rank (ties to the lower rank), each share in order."""
    load, shares = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += sizes[i]
    return [sorted(share) for share in shares]


def _fill(embeds: torch.Tensor, mask: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
    """Put `features` (in order) at the `mask` positions. Without a mask the features are a dummy's output: it joins
    the graph with weight zero, so its encoder's parameters get (zero) gradients on this rank as on every other."""
    if mask is None:
        return embeds + 0.0 * features.sum()
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(f"{int(mask.sum())} placeholder tokens but {features.shape[0]} encoder outputs")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
