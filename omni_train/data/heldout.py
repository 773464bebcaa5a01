"""Held-out micro-batches: the same samples, in the same order, at every evaluation.

Owns `HeldOut`, one rank's share of one evaluation source: every sample of the source's shards is read once, in
shard order; sample i goes to data-parallel rank i mod world (so each sample is evaluated exactly once across
ranks, whatever their number); a rank packs its share best-fit into rows of `max_len` tokens (whole samples, as in
training) and groups the rows into micro-batches. The plan holds only the samples' compressed bytes; their media
are decoded at each evaluation (in the calling process, or by `workers` DataLoader processes, whose order the
DataLoader keeps). A sample longer than `max_len`, unreadable, or without the speech the objective needs is set
aside and counted by reason, never cut; a programming error propagates (loader.SYSTEM_EXCEPTIONS).

Every rank must run the same number of micro-batches (ZeRO-3 gathers per forward): `batches(count)` pads a short
share with `filler` micro-batches of weight 0, the rank's own last micro-batch or, for a rank that holds none, the
source's first sample alone.
"""

from __future__ import annotations

from collections import Counter

import torch

from omni_train.data.batch import best_fit, collate_packed, decode_sample
from omni_train.data.loader import (
    SYSTEM_EXCEPTIONS,
    ShardSet,
    Speech,
    _check_speech,
    _read_shard,
    _SetAside,
    check_speech_members,
    decode_safe,
    set_aside_reason,
)


def _decode(rows: list[list[dict]], max_len: int, pad_id: int, speech: Speech) -> tuple[dict | None, Counter]:
    """A micro-batch from rows of raw samples, and the reasons of the samples set aside while decoding (None when
    every sample was)."""
    decoded, aside = [], Counter()
    for row in rows:
        decoded.append([])
        for raw in row:
            try:
                sample = decode_sample(raw)
                _check_speech(sample, speech)
            except SYSTEM_EXCEPTIONS:
                raise
            except Exception as e:  # noqa: BLE001 - a bad media file costs its sample only
                aside[set_aside_reason(e)] += 1
                continue
            decoded[-1].append(sample)
    if not any(decoded):
        return None, aside
    return collate_packed(decoded, max_len, pad_id), aside


class _Plan(torch.utils.data.Dataset):
    """Micro-batch k of a rank's plan, decoded and collated (a DataLoader worker may call this)."""

    def __init__(self, groups: list[list[list[dict]]], max_len: int, pad_id: int, speech: Speech):
        self.groups, self.max_len, self.pad_id, self.speech = groups, max_len, pad_id, speech

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> tuple[dict | None, Counter]:
        return _decode(self.groups[k], self.max_len, self.pad_id, self.speech)


class HeldOut:
    def __init__(self, source: ShardSet, rank: int, world: int, max_len: int, rows: int, pad_id: int,
                 speech: Speech = Speech.none, max_batches: int = 0, workers: int = 0):
        self.name, self.workers = source.name, workers
        self.set_aside: Counter[str] = Counter()
        mine, first = [], None
        index = position = 0  # good samples so far (who evaluates them), all samples (who counts the bad ones)
        for url in source.urls:
            for raw in _read_shard(url):
                position += 1
                try:
                    sample = decode_safe(raw)
                    length = len(sample["input_ids.npy"])
                    if length > max_len:
                        raise _SetAside("longer than max_len", f"{length} tokens > max_len={max_len}")
                    check_speech_members(sample, speech)
                except SYSTEM_EXCEPTIONS:
                    raise
                except Exception as e:  # noqa: BLE001 - a bad held-out sample is set aside and counted (once)
                    if (position - 1) % world == rank:
                        self.set_aside[set_aside_reason(e)] += 1
                    continue
                first = first or sample
                if index % world == rank:
                    mine.append(sample)
                index += 1
        self.samples = index  # held-out samples of the source (all ranks)
        bins = best_fit([len(s["input_ids.npy"]) for s in mine], max_len)
        packed = [[mine[i] for i in b] for b in bins]
        groups = [packed[i:i + rows] for i in range(0, len(packed), rows)]
        if max_batches > 0:
            groups = groups[:max_batches]
        self.plan = _Plan(groups, max_len, pad_id, speech)
        self.filler = groups[-1] if groups else ([[first]] if first is not None else None)

    def __len__(self) -> int:
        return len(self.plan)

    def batches(self, count: int):
        """(micro-batch, weight) x count: this rank's micro-batches (weight 1), then fillers (weight 0). Samples set
        aside while decoding are added to `set_aside`."""
        if self.workers > 0 and len(self.plan):
            loader = torch.utils.data.DataLoader(self.plan, batch_size=None, num_workers=self.workers,
                                                 multiprocessing_context="spawn", persistent_workers=False)
        else:
            loader = (self.plan[k] for k in range(len(self.plan)))
        done = 0
        for batch, aside in loader:
            self.set_aside.update(aside)
            done += 1
            yield (batch, 1.0) if batch is not None else (self._filler(), 0.0)
        for _ in range(count - done):
            yield self._filler(), 0.0

    def _filler(self) -> dict:
        batch, _ = _decode(self.filler, self.plan.max_len, self.plan.pad_id, self.plan.speech)
        if batch is None:
            raise ValueError(f"held-out source {self.name}: the sample kept to pad short shares does not decode")
        return batch
