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
from omni_train.batch import CONDITIONS

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

    With sequence parallelism (`sp`, omni_train.attention.SequenceParallel) every rank of a group embeds the whole
    row (media included), then keeps its slice of embeddings, 3-D positions and shifted targets; the language model
    and the loss run on the slice.

    forward returns (loss sum, stats): stats is a detached (2, 4) tensor, label-token loss sums and counts of this
    rank's slice per condition in CONDITIONS order (text-only samples, then samples with audio, images, video).
    """

    def __init__(self, thinker: nn.Module, sp=None):
        super().__init__()
        self.thinker = thinker
        self.sp = sp

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

    def forward(self, input_ids, labels, position_ids, conditions, audio_features=None, audio_lengths=None,
                pixel_values=None, grid_thw=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss sum of a packed batch (omni_train.batch.collate_packed): the leading position row marks samples."""
        embeds = self.embed(input_ids, audio_features, audio_lengths, pixel_values, grid_thw)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position i predicts token i + 1
        if self.sp is not None:
            embeds, position_ids = self.sp.shard(embeds, 1), self.sp.shard(position_ids, 2)
            targets, conditions = self.sp.shard(targets, 1), self.sp.shard(conditions, 1)
        hidden = self.thinker.model.language_model(
            inputs_embeds=embeds, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        keep = targets != IGNORE
        # lm_head runs once per micro-batch even when `keep` is empty, so every rank issues the same ZeRO-3 gathers.
        logits = self.thinker.lm_head(hidden[keep]).float()
        token_loss = F.cross_entropy(logits, targets[keep], reduction="none")
        return token_loss.sum(), condition_stats(token_loss.detach(), conditions[keep])


def _fill(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor, dummy: bool) -> torch.Tensor:
    """Put `features` (in order) at the `mask` positions; a dummy's output joins the graph with weight zero, so
    its encoder's parameters get (zero) gradients on this rank as on every other."""
    if dummy:
        return embeds + 0.0 * features.sum()
    if int(mask.sum()) != features.shape[0]:
        raise ValueError(f"{int(mask.sum())} placeholder tokens but {features.shape[0]} encoder outputs")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))


def condition_stats(token_loss: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """(2, len(CONDITIONS)) float64: loss sum and token count of the labelled tokens of each condition. A sample
    with several media counts toward each of them; "text" is samples with none."""
    stats = torch.zeros(2, len(CONDITIONS), dtype=torch.float64)
    for i, bit in enumerate(CONDITIONS.values()):
        mask = conditions == 0 if bit == 0 else (conditions & bit) != 0
        stats[0, i], stats[1, i] = token_loss[mask].double().sum(), mask.sum()
    return stats


def label_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (targets are labels shifted by one)."""
    return int((labels[:, 1:] != IGNORE).sum())
