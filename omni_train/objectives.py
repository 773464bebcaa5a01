"""Training objectives: nn.Modules that wrap transformers' models and return the loss of a micro-batch.

Owns: the Thinker's next-token cross-entropy, computed only at labelled positions (the 152k-wide logits of an
unlabelled position are never formed), returned as a *sum* so the loop can normalise by the real label-token count
of the whole optimizer step across ranks and accumulation steps. The DeepSpeed engine wraps these modules, so
their parameter names carry the released checkpoint's prefixes (`thinker.`, later `talker.`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.chatml import IGNORE


class ThinkerLM(nn.Module):
    def __init__(self, thinker: nn.Module):
        super().__init__()
        self.thinker = thinker

    def forward(self, input_ids, labels, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.thinker.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        # lm_head runs once per micro-batch even when `keep` is empty, so every rank issues the same ZeRO-3 gathers.
        logits = self.thinker.lm_head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum")


def label_tokens(labels: torch.Tensor) -> int:
    """Number of positions that contribute to the loss (targets are labels shifted by one)."""
    return int((labels[:, 1:] != IGNORE).sum())
