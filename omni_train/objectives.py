"""Training objectives: nn.Modules that wrap transformers' models and return the loss of a micro-batch.

Owns: the Thinker's next-token cross-entropy (media embedded ZeRO-3-safely, see ThinkerLM), computed only at
labelled positions (the 152k-wide logits of an unlabelled position are never formed; with `logits_chunk` the head
and the loss are fused and tiled, so not even the labelled positions' logits exist at once), returned as a *sum* so
the loop can normalise by the real label-token count of the whole optimizer step across ranks and accumulation
steps. The DeepSpeed engine wraps these modules, so their parameter names carry the released checkpoint's prefixes
(`thinker.`, later `talker.`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.chatml import IGNORE
from data_prep.layout import AUDIO, IMAGE, VIDEO
from omni_train.batch import CONDITIONS
from omni_train.head_loss import HeadLoss

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

    With sequence parallelism (`sp`, omni_train.attention.SequenceParallel) the ranks of a group share the row's
    media out between them for the encoders (see `_encode`), all-gather the encoder outputs, embed the whole row,
    then each keeps its slice of embeddings, 3-D positions and shifted targets; the language model and the loss run
    on the slice.

    forward returns (loss sum, stats): stats is a detached (2, 4) tensor, label-token loss sums and counts of this
    rank's slice per condition in CONDITIONS order (text-only samples, then samples with audio, images, video).
    """

    def __init__(self, thinker: nn.Module, sp=None, logits_chunk: int = 0):
        super().__init__()
        self.thinker = thinker
        self.sp = sp
        # > 0: the LM head and its cross-entropy fused, this many labelled tokens at a time (omni_train.head_loss)
        self.head_loss = HeadLoss(thinker.lm_head, logits_chunk) if logits_chunk > 0 else None

    units_name = "label_tokens"

    def units(self, batch: dict) -> float:
        """What the step's loss is averaged over: the label tokens (targets are labels shifted by one)."""
        return float(label_tokens(batch["labels"]))

    def step_metrics(self, stats: torch.Tensor) -> dict[str, float]:
        """Per-condition losses and label counts of a step, from the (2, 4) stats summed over ranks."""
        cond_loss, cond_tokens = stats.view(2, len(CONDITIONS)).tolist()
        return {**{f"loss/{name}": total / n for name, total, n in zip(CONDITIONS, cond_loss, cond_tokens) if n},
                **{f"label_tokens/{name}": int(n) for name, n in zip(CONDITIONS, cond_tokens)}}

    def embed(self, input_ids, audio_features=None, audio_lengths=None, pixel_values=None, grid_thw=None):
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
        # The head runs once per micro-batch even when `keep` is empty, so every rank issues the same ZeRO-3 gathers.
        if self.head_loss is not None:
            token_loss = self.head_loss(hidden[keep], targets[keep])
        else:
            token_loss = F.cross_entropy(self.thinker.lm_head(hidden[keep]).float(), targets[keep], reduction="none")
        return token_loss.sum(), condition_stats(token_loss.detach(), conditions[keep])


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
