"""The packed attention core as it was before the batch carried sample boundaries (commit a4d81a7): boundaries read
from the text positions in every call (a `.tolist()` per layer), causal SDPA on a slice of the row per sample. The
reference the new core must equal (tests/test_attention_core.py) and the baseline benchmarks/attention_core.py
measures it against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_spans(text_positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sample in one packed row, from its text positions (0 where a sample starts)."""
    starts = torch.nonzero(text_positions == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], len(text_positions)]))


def per_sample_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                         position_ids=None, **_) -> tuple[torch.Tensor, None]:
    """query (B, H, L, D), key/value (B, H_kv, L, D), position_ids the (B, L) text positions -> (B, L, H, D)."""
    rows = []
    for b in range(query.shape[0]):
        pieces = [
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           dropout_p=dropout, is_causal=True, scale=scaling,
                                           enable_gqa=query.shape[1] != key.shape[1])
            for s, e in document_spans(position_ids[b])
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None
