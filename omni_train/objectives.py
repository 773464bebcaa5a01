"""Training objectives: nn.Modules that wrap transformers' models and return the loss of a micro-batch.

Owns: the Thinker's next-token cross-entropy (media embedded ZeRO-3-safely, see ThinkerLM), computed only at labelled positions (the 152k-wide logits of an
unlabelled position are never formed), returned as a *sum* so the loop can normalise by the real label-token count
of the whole optimizer step across ranks and accumulation steps. The DeepSpeed engine wraps these modules, so
their parameter names carry the released checkpoint's prefixes (`thinker.`, later `talker.`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.chatml import IGNORE
from data_prep.layout import AUDIO, IMAGE, VIDEO

# The smallest inputs each encoder accepts: a 1-s silent clip (100 mel frames -> 25 tokens) and one 28 x 28 image.
DUMMY_MEL_FRAMES = 100
DUMMY_GRID = (1, 2, 2)


class ThinkerLM(nn.Module):
    """Next-token cross-entropy of transformers' Qwen2.5-Omni Thinker on packed batches.

    Media embeddings are computed here, not in transformers' `Qwen2_5OmniThinkerModel.forward`, for one reason:
    under ZeRO-3 every rank must issue the same parameter gathers every micro-batch. So the audio encoder runs
    exactly once per micro-batch on all clips together, and the vision encoder exactly once on all images and videos
    together (transformers' forward calls the vision encoder twice when a batch has both); a micro-batch without
    audio (or without pixels) feeds the encoder a dummy input whose output enters the loss multiplied by zero.
    In transformers 5.24 both encoders are batched inside (each submodule runs once per call, whatever the number
    of clips or images), so the gathers do not depend on the data. (DeepSpeed's `set_z3_leaf_modules` would also
    decouple them, but on its CPU accelerator ZeRO-3's `zero_grad` then fails calling `record_stream` on CPU grads.)
    The merge itself is transformers' (placeholder positions filled in order).
    """

    def __init__(self, thinker: nn.Module):
        super().__init__()
        self.thinker = thinker

    def embed(self, input_ids, audio_features=None, audio_lengths=None, pixel_values=None, grid_thw=None):
        model = self.thinker.model
        embeds = model.get_input_embeddings()(input_ids)
        tower = model.audio_tower
        no_audio = audio_features is None
        if no_audio:
            audio_features = embeds.new_zeros(tower.config.num_mel_bins, DUMMY_MEL_FRAMES, dtype=torch.float32)
            audio_lengths = torch.tensor([DUMMY_MEL_FRAMES], device=input_ids.device)
        after_cnn, _ = tower._get_feat_extract_output_lengths(audio_lengths)
        audio = tower(audio_features.to(tower.conv1.weight.dtype), feature_lens=audio_lengths,
                      aftercnn_lens=after_cnn).last_hidden_state
        embeds = _fill(embeds, input_ids == AUDIO, audio, dummy=no_audio)
        visual = model.visual
        no_pixels = pixel_values is None
        if no_pixels:
            rows = DUMMY_GRID[0] * DUMMY_GRID[1] * DUMMY_GRID[2]
            pixel_values = embeds.new_zeros(rows, visual.patch_embed.proj.weight[0].numel(), dtype=torch.float32)
            grid_thw = torch.tensor([DUMMY_GRID], device=input_ids.device)
        vision = visual(pixel_values.to(visual.patch_embed.proj.weight.dtype), grid_thw=grid_thw).pooler_output
        return _fill(embeds, (input_ids == IMAGE) | (input_ids == VIDEO), vision, dummy=no_pixels)

    def forward(self, input_ids, labels, position_ids, audio_features=None, audio_lengths=None, pixel_values=None,
                grid_thw=None) -> torch.Tensor:
        """Loss sum of a packed batch (omni_train.batch.collate_packed): the leading position row marks samples."""
        embeds = self.embed(input_ids, audio_features, audio_lengths, pixel_values, grid_thw)
        hidden = self.thinker.model.language_model(
            inputs_embeds=embeds, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        # lm_head runs once per micro-batch even when `keep` is empty, so every rank issues the same ZeRO-3 gathers.
        logits = self.thinker.lm_head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum")


def _fill(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, dummy: bool) -> torch.Tensor:
    """Put `features` (in order) at the `mask` positions; a dummy's output joins the graph with weight zero, so
    its encoder's parameters get (zero) gradients on this rank as on every other."""
    if dummy:
        return embeds + 0.0 * features.sum()
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(f"{int(mask.sum())} placeholder tokens but {features.shape[0]} encoder outputs")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


def label_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (targets are labels shifted by one)."""
    return int((labels[:, 1:] != IGNORE).sum())
