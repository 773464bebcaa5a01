"""The Thinker's training objective: next-token cross-entropy of transformers' Qwen2.5-Omni Thinker.

Owns `ThinkerLM`: the loss computed only at labelled positions (the 152k-wide logits of an unlabelled position are
never formed; with `logits_chunk` the head and the loss are fused and tiled, so not even the labelled positions'
logits exist at once), returned as a *sum* so the loop can normalise by the real label-token count of the whole
optimizer step across ranks and accumulation steps. The DeepSpeed engine wraps this module, so its parameter names
carry the released checkpoint's prefix (`thinker.`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.data.batch import CONDITIONS
from omni_train.model.kernels.attention import varlen_kwargs
from omni_train.model.kernels.head_loss import HeadLoss
from omni_train.model.media import MediaEmbedder
from omni_train.tokens import IGNORE


class ThinkerLM(nn.Module):
    """Next-token cross-entropy of transformers' Qwen2.5-Omni Thinker on packed batches.

    Media are embedded by `MediaEmbedder` (omni_train.model.media: each encoder once per micro-batch, whatever the
    data, as ZeRO-3 needs). With sequence parallelism (`sp`, omni_train.model.kernels.attention.SequenceParallel)
    every rank of a group embeds the whole row, then keeps its slice of embeddings, 3-D positions and shifted
    targets; the language model and the loss run on the slice.

    forward returns (loss sum, stats): stats is a detached (2, 4) float64 tensor on the loss's device, label-token
    loss sums and counts of this rank's slice per condition in CONDITIONS order (text-only samples, then samples
    with audio, images, video).
    """

    def __init__(self, thinker: nn.Module, sp=None, logits_chunk: int = 0):
        super().__init__()
        self.thinker = thinker
        self.sp = sp
        self.media = MediaEmbedder(thinker, sp)
        # > 0: the LM head and its cross-entropy fused, this many labelled tokens at a time (kernels.head_loss)
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

    def forward(self, input_ids, labels, position_ids, conditions, cu_seq_lens, max_length, audio_features=None,
                audio_lengths=None, pixel_values=None, grid_thw=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss sum of a packed batch (omni_train.data.batch.collate_packed): cu_seq_lens and max_length mark its
        samples for the attention. They describe whole rows, also under sequence parallelism: the Ulysses layer
        hands its core the whole row."""
        embeds = self.media(input_ids, audio_features, audio_lengths, pixel_values, grid_thw)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position i predicts token i + 1
        if self.sp is not None:
            embeds, position_ids = self.sp.shard(embeds, 1), self.sp.shard(position_ids, 2)
            targets, conditions = self.sp.shard(targets, 1), self.sp.shard(conditions, 1)
        hidden = self.thinker.model.language_model(
            inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **varlen_kwargs(cu_seq_lens, max_length)
        ).last_hidden_state
        keep = targets != IGNORE
        # The head runs once per micro-batch even when `keep` is empty, so every rank issues the same ZeRO-3 gathers.
        if self.head_loss is not None:
            token_loss = self.head_loss(hidden[keep], targets[keep])
        else:
            token_loss = F.cross_entropy(self.thinker.lm_head(hidden[keep]).float(), targets[keep], reduction="none")
        return token_loss.sum(), condition_stats(token_loss.detach(), conditions[keep])


def condition_stats(token_loss: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """(2, len(CONDITIONS)) float64, on token_loss's device: loss sum and token count of the labelled tokens of each
    condition. A sample with several media counts toward each of them; "text" is samples with none."""
    sums, counts = [], []
    for bit in CONDITIONS.values():
        mask = conditions == 0 if bit == 0 else (conditions & bit) != 0
        # Selected, not masked to zero: a sum over the whole vector would round differently. On a GPU the
        # selection reads the mask's count back, as the selection of labelled positions in forward does.
        sums.append(token_loss[mask].double().sum())
        counts.append(mask.sum().double())
    return torch.stack([torch.stack(sums), torch.stack(counts)])


def label_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (targets are labels shifted by one)."""
    return int((labels[:, 1:] != IGNORE).sum())
