"""Training data for the loop: conversations -> encoded samples -> per-rank micro-batches, resumable.

Owns: reading a JSONL of conversations, encoding each through `data_prep.chatml`, setting aside (with the reason)
samples that cannot train, a deterministic per-rank order that gives every rank the same number of micro-batches
per epoch (so no rank waits in a collective for one that ran out), collation with padding, and a loader state
(epoch, cursor, world size) that a checkpoint restores exactly in O(1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.chatml import IGNORE, SampleError, encode
from omni_train.config import ConfigError, DataConfig


@dataclass
class Sample:
    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray


def load_conversations(path: str, tokenizer, max_len: int) -> tuple[list[Sample], list[dict]]:
    """Encode every conversation of a JSONL file. Returns (samples, rejects); a reject names its line and reason."""
    samples, rejects = [], []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            sid = f"{Path(path).name}:{line_no}"
            try:
                record = json.loads(line)
                sid = record.get("id", sid)
                enc = encode(record["messages"], tokenizer)
            except (json.JSONDecodeError, KeyError, TypeError, SampleError) as e:
                rejects.append({"id": sid, "reason": f"{type(e).__name__}: {e}"})
                continue
            if len(enc["input_ids"]) > max_len:
                rejects.append({"id": sid, "reason": f"{len(enc['input_ids'])} tokens > data.max_len={max_len}"})
                continue
            samples.append(Sample(sid, enc["input_ids"], enc["labels"], enc["position_ids"]))
    return samples, rejects


def collate(samples: list[Sample], pad_id: int, pad_to_multiple_of: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample (rounded up); padding has attention 0 and label -100."""
    longest = max(len(s.input_ids) for s in samples)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    b = len(samples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    position_ids = torch.zeros((3, b, length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.from_numpy(s.input_ids)
        labels[i, :n] = torch.from_numpy(s.labels)
        attention_mask[i, :n] = 1
        position_ids[:, i, :n] = torch.from_numpy(s.position_ids)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


class Loader:
    """Endless micro-batches for one data-parallel rank, epoch after epoch.

    Each epoch is a seeded permutation of all samples, cut into global batches of `world * micro_batch` and dealt
    round-robin; the tail that does not fill a global batch is left for the next epoch's permutation, so every rank
    takes the same number of steps. The state is (epoch, cursor): restoring it costs nothing, whatever the position.
    """

    def __init__(self, samples, micro_batch: int, rank: int, world: int, seed: int, shuffle: bool, pad_id: int,
                 pad_to_multiple_of: int):
        if len(samples) < micro_batch * world:
            raise ConfigError(
                f"{len(samples)} usable samples cannot fill one step of {world} ranks x {micro_batch} per rank: "
                "add data or lower trainer.micro_batch_size"
            )
        self.samples, self.micro_batch, self.rank, self.world = samples, micro_batch, rank, world
        self.seed, self.shuffle, self.pad_id, self.pad_to_multiple_of = seed, shuffle, pad_id, pad_to_multiple_of
        self.batches_per_epoch = len(samples) // (micro_batch * world)
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def next_batch(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        if self.cursor == self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        global_batch = self.micro_batch * self.world
        start = self.cursor * global_batch + self.rank * self.micro_batch
        picked = [self.samples[i] for i in self._order(self.epoch)[start : start + self.micro_batch]]
        self.cursor += 1
        return collate(picked, self.pad_id, self.pad_to_multiple_of), [s.id for s in picked]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "world": self.world, "num_samples": len(self.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world or state["num_samples"] != len(self.samples):
            raise ConfigError(
                f"checkpoint was written by {state['world']} ranks over {state['num_samples']} samples; this run has "
                f"{self.world} ranks over {len(self.samples)}: resume with the same world size and data, or start "
                "a new run_dir from its export (model.path=...)"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def build_loader(cfg: DataConfig, tokenizer, micro_batch: int, rank: int, world: int, seed: int):
    samples, rejects = load_conversations(cfg.train, tokenizer, cfg.max_len)
    loader = Loader(samples, micro_batch, rank, world, seed, cfg.shuffle, tokenizer.pad_token_id, cfg.pad_to_multiple_of)
    return loader, rejects
