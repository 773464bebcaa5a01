"""Streaming loader: shards -> mixed, shuffled, packed micro-batches, per rank and worker, restorable in O(1).

Mental model (one line per class):
- `ShardSet`     source: the shard URLs of one source (a prepared directory, a glob, a brace list, or any URL
                  webdataset opens), checked against the tokenizer through the build's index when there is one.
- `SlotReader`   dataset: one source's samples for one loader slot (rank x worker), epoch after epoch; each epoch
                  a seeded shard order, dealt round-robin to the slots (by sample when there are fewer shards
                  than slots); a position is (epoch, shard, sample offset).
- `SlotStream`   compose: samples drawn from the sources by weight (a counter-based RNG, so a draw is a pure
                  function of its index), cut into windows of `chunk_samples`, each shuffled (seeded) and
                  best-fit packed by token count into rows of `max_len`; rows grouped into micro-batches, whose
                  media are decoded only then (a window holds compressed bytes, so it can span many rows).
- `LoaderState`  the resume point of a slot: where its current chunk started (per-source positions, draws made)
                  and how many micro-batches of that chunk were delivered. Restoring re-reads one chunk, never
                  the epoch before it.

A corrupt sample (unreadable tar member, broken json/npy, undecodable media, missing speech codes) is set aside,
counted per source and reason; more than `max_bad_samples` in a row (whether found while reading a window or while
decoding a micro-batch's media) stops the run with one clear line. A programming error is not bad data: the
exceptions in SYSTEM_EXCEPTIONS (an import that fails, a name that does not exist, ...) propagate with their trace
wherever they are raised. Nothing is unpickled: only json and npy (allow_pickle=False) are decoded from shards;
members that would need unpickling (.pyd, .pickle, .pkl, .pth) are never decoded, and a sample that carries one
beside its own members is read without it.
"""

from __future__ import annotations

import enum
import glob
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omni_train.data.batch import best_fit, collate_packed, decode_sample
from omni_train.errors import ConfigError

# Raised by a bug or a broken environment, never by a bad sample: they stop the run with their trace instead of
# setting samples aside (Megatron-Energon's SYSTEM_EXCEPTIONS, the same idea).
SYSTEM_EXCEPTIONS = (SystemError, SyntaxError, ImportError, NameError, MemoryError, RecursionError, ReferenceError,
                     StopIteration, StopAsyncIteration, NotImplementedError)


def _expand(pattern: str) -> list[str]:
    """Shard URLs of a source: a prepared directory, a glob, a brace list, or URLs passed through."""
    from braceexpand import braceexpand

    path = Path(pattern)
    if (path / "index.json").is_file():  # a build, or merged parts: the shards its index lists, in its order
        urls = [str(path / s["name"]) for s in json.loads((path / "index.json").read_text())["shards"]]
    elif path.is_dir():
        urls = sorted(str(p) for p in path.glob("shard-*.tar"))
    else:
        urls = []
        for part in braceexpand(pattern):
            urls += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    if not urls:
        raise ConfigError(f"data source {pattern!r} matches no shard")
    return urls


@dataclass
class ShardSet:
    name: str
    urls: list[str]
    weight: float = 1.0

    @classmethod
    def open(cls, name: str, pattern: str, weight: float, tokenizer=None) -> ShardSet:
        if Path(pattern).is_dir() and tokenizer is not None:
            from data_prep.build import load_index

            load_index(pattern, tokenizer)  # refuses shards made with another tokenizer
        return cls(name, _expand(pattern), weight)


PICKLED = ("pyd", "pickle", "pkl", "pth")  # member extensions that only unpickling would read


def decode_safe(raw: dict) -> dict:
    """json and npy decoded, media left as bytes; a member that would need unpickling (.pyd, .pickle, .pkl, .pth)
    is left out, never decoded (nothing this framework writes has one, so the sample is read without it)."""
    out = {}
    for key, value in raw.items():
        if key.startswith("__"):
            out[key] = value
        elif key.rsplit(".", 1)[-1] in PICKLED:
            continue
        elif key == "json" or key.endswith(".json"):
            out[key] = json.loads(value)
        elif key.endswith(".npy"):
            out[key] = np.load(io.BytesIO(value), allow_pickle=False)
        else:
            out[key] = value
    return out


def _read_shard(url: str):
    """Raw samples of one shard in order (dicts of member bytes), via webdataset's own tar reading."""
    import webdataset as wds

    stream = wds.WebDataset([url], shardshuffle=False, nodesplitter=lambda s: s, workersplitter=lambda s: s,
                            handler=wds.reraise_exception)
    yield from stream


class _SetAside(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def set_aside_reason(error: Exception) -> str:
    """The reason a bad sample is counted under: its _SetAside kind, or "undecodable sample" for anything else."""
    return error.kind if isinstance(error, _SetAside) else "undecodable sample"


class Speech(enum.StrEnum):
    """What a stage needs of each sample's speech (declared by its recipe, omni_train/train/recipes)."""

    none = "none"  # nothing: the Thinker stages
    chosen = "chosen"  # codec ids of the spoken reply: talker_sft
    pair = "pair"  # chosen and rejected codec ids: talker_dpo


def _check_speech(sample, need: Speech) -> None:
    """A decoded sample (batch.ModelSample) holds the speech the stage needs, or is set aside with the reason."""
    _speech_needed(sample.id, sample.speech is not None, sample.speech is not None and sample.speech.rejected is not
                   None, need)


def check_speech_members(raw: dict, need: Speech) -> None:
    """The same check on a shard sample's members, before its media are decoded."""
    _speech_needed(raw.get("__key__", "?"), "speech.chosen.npy" in raw, "speech.rejected.npy" in raw, need)


def _speech_needed(sample_id: str, chosen: bool, rejected: bool, need: Speech) -> None:
    if need != Speech.none and not chosen:
        raise _SetAside("no speech codes (a Talker stage needs them)", f"sample {sample_id} has no speech")
    if need == Speech.pair and not rejected:
        raise _SetAside("no rejected codes (talker_dpo needs triplets)", f"sample {sample_id} has no rejected codes")


@dataclass
class Position:
    epoch: int = 0
    shard: int = 0  # index into this slot's shard list for the epoch
    offset: int = 0  # samples of that shard (or remainder unit) already taken (all of them, when splitting by sample)
    unit: int = 0  # remainder units (samples re-dealt after a change of layout, see `redeal`) already read


class SlotReader:
    """One source's samples for slot `slot` of `slots`, forever, from a `Position`: first the `remainder` units
    this slot was dealt after a change of layout (`redeal`), then epoch after epoch."""

    def __init__(self, shards: ShardSet, slot: int, slots: int, seed: int, position: Position, resample: bool = False,
                 remainder: list[dict] = ()):
        self.shards, self.slot, self.slots, self.seed, self.resample = shards, slot, slots, seed, resample
        self.position = Position(**vars(position))
        self.remainder = list(remainder)

    def _plan(self, epoch: int) -> tuple[list[str], bool]:
        """(this slot's shards in order, whether samples are split by index instead of by shard). In resampled
        mode an "epoch" is a draw of as many shards, with replacement."""
        rng = np.random.default_rng([self.seed, epoch, 7])
        n = len(self.shards.urls)
        order = rng.integers(0, n, n) if self.resample else rng.permutation(n)
        urls = [self.shards.urls[i] for i in order]
        if len(urls) >= self.slots:
            return urls[self.slot :: self.slots], False
        return urls, True

    def _units(self):
        """The remainder: each unit is a shard's samples from index `start` whose index is `rem` modulo `mod` (and,
        when `keys` is given, whose key is one of them), tagged with the epoch they belong to."""
        while self.position.unit < len(self.remainder):
            unit = self.remainder[self.position.unit]
            keys = None if unit["keys"] is None else set(unit["keys"])
            try:
                for index, raw in enumerate(_read_shard(unit["url"])):
                    if index < max(self.position.offset, unit["start"]):
                        continue
                    self.position.offset = index + 1
                    if index % unit["mod"] != unit["rem"] or (keys is not None and raw["__key__"] not in keys):
                        continue
                    yield unit["epoch"], raw, None
            except Exception as e:  # noqa: BLE001 - as in an epoch: an unreadable tar ends that unit
                self.position.unit, self.position.offset = self.position.unit + 1, 0
                yield unit["epoch"], None, f"unreadable shard ({type(e).__name__}: {e})"
                continue
            self.position.unit, self.position.offset = self.position.unit + 1, 0

    def pending(self) -> list[dict]:
        """The units of samples this reader has not yielded yet in its current epoch (the rest of its remainder, the
        rest of the shard it is in, the shards after it): what `redeal` hands to the slots of a new layout."""
        units = [dict(u) for u in self.remainder[self.position.unit:]]
        if units:
            units[0]["start"] = max(units[0]["start"], self.position.offset)
            return units + self._epoch_units(self.position.epoch, 0, 0)
        return self._epoch_units(self.position.epoch, self.position.shard, self.position.offset)

    def _epoch_units(self, epoch: int, shard: int, offset: int) -> list[dict]:
        urls, by_sample = self._plan(epoch)
        mod, rem = (self.slots, self.slot) if by_sample else (1, 0)
        return [{"url": url, "start": offset if k == shard else 0, "mod": mod, "rem": rem, "keys": None,
                 "epoch": epoch} for k, url in enumerate(urls) if k >= shard]

    def __iter__(self):
        """Yields (epoch, raw sample, None), or (epoch, None, reason) once for a shard that cannot be read on."""
        yield from self._units()
        while True:
            urls, by_sample = self._plan(self.position.epoch)
            while self.position.shard < len(urls):
                try:
                    for index, raw in enumerate(_read_shard(urls[self.position.shard])):
                        if index < self.position.offset:
                            continue
                        self.position.offset = index + 1
                        if by_sample and index % self.slots != self.slot:
                            continue
                        yield self.position.epoch, raw, None
                except Exception as e:  # noqa: BLE001 - a truncated or unreadable tar ends that shard, not the run
                    self.position.shard, self.position.offset = self.position.shard + 1, 0
                    yield self.position.epoch, None, f"unreadable shard ({type(e).__name__}: {e})"
                    continue
                self.position.shard, self.position.offset = self.position.shard + 1, 0
            self.position = Position(self.position.epoch + 1, 0, 0)


@dataclass
class LoaderState:
    """Where a slot's current chunk began, and how far into it delivery got."""

    positions: dict[str, dict] = field(default_factory=dict)
    draws: int = 0
    chunk: int = 0
    delivered: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # corrupt samples set aside so far, by source: reason
    remainder: dict[str, list[dict]] = field(default_factory=dict)  # per source, units dealt by `redeal`


@dataclass
class MicroBatch:
    batch: dict[str, torch.Tensor]
    ids: list[str]
    sources: dict[str, int]
    epochs: list[int]
    real_tokens: int
    capacity: int
    state: LoaderState  # the resume point after this micro-batch (its `skipped` counts corrupt samples so far)


class SlotStream:
    """Mixed, chunk-shuffled, packed micro-batches of one slot."""

    def __init__(self, sources: list[ShardSet], slot: int, slots: int, seed: int, max_len: int, rows: int,
                 chunk_samples: int, pad_id: int, state: LoaderState | None = None, max_bad_samples: int = 100,
                 resample: bool = False, speech: Speech = Speech.none):
        self.sources, self.slot, self.slots, self.seed = sources, slot, slots, seed
        self.bad_in_a_row = 0  # bad samples since the last good one, wherever they were found
        self.max_len, self.rows, self.chunk_samples, self.pad_id = max_len, rows, chunk_samples, pad_id
        self.max_bad_samples, self.resample, self.speech = max_bad_samples, resample, speech
        self.state = state or LoaderState({s.name: vars(Position()) for s in sources})
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if (weights <= 0).any():
            raise ConfigError(f"data source weights must be positive, got {weights.tolist()}")
        self.cumulative = np.cumsum(weights / weights.sum())

    def _source_of(self, draw: int) -> int:
        u = np.random.default_rng([self.seed, self.slot, draw, 11]).random()
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.sources) - 1)

    def _set_aside(self, skipped: dict[str, int], source: str, error: Exception) -> None:
        """Count a bad sample under its source and reason; more than max_bad_samples in a row stop the run."""
        reason = f"{source}: {set_aside_reason(error)}"
        skipped[reason] = skipped.get(reason, 0) + 1
        self.bad_in_a_row += 1
        if self.bad_in_a_row > self.max_bad_samples:
            raise ConfigError(f"{self.bad_in_a_row} corrupt samples in a row in source {source} (last: {error}); "
                              "check its shards") from None

    def _chunk(self, readers, state: LoaderState, skipped: dict[str, int]):
        """Draw one window of samples and pack it by token count. Only json and npy are decoded here (cheap), so a
        window can span many rows; media are decoded when a micro-batch is built. Returns rows of
        (raw sample, source, epoch, length) and the draw counter after the window."""
        items, draws = [], state.draws
        while len(items) < self.chunk_samples:
            k = self._source_of(draws)
            draws += 1
            source = self.sources[k].name
            epoch, raw, error = next(readers[k])
            try:
                if error is not None:
                    raise _SetAside(error.split(" (")[0], error)
                raw = decode_safe(raw)
                length = len(raw["input_ids.npy"])
                if length > self.max_len:
                    raise _SetAside("longer than max_len", f"{length} tokens > max_len={self.max_len}")
            except SYSTEM_EXCEPTIONS:
                raise
            except Exception as e:  # noqa: BLE001 - any defect of one sample sets only that sample aside
                self._set_aside(skipped, source, e)
                continue
            self.bad_in_a_row = 0
            items.append((raw, source, epoch, length))
        order = np.random.default_rng([self.seed, self.slot, state.chunk, 13]).permutation(len(items))
        items = [items[i] for i in order]
        bins = best_fit([n for *_, n in items], self.max_len)
        return [[items[i] for i in b] for b in bins], draws

    def _decode_rows(self, rows, skipped: dict[str, int]):
        """Decode the media of a micro-batch's rows; a sample whose media fail is dropped from its row."""
        decoded, kept = [], []
        for row in rows:
            decoded.append([])
            for raw, source, epoch, _ in row:
                try:
                    sample = decode_sample(raw)
                    _check_speech(sample, self.speech)
                except SYSTEM_EXCEPTIONS:
                    raise
                except Exception as e:  # noqa: BLE001 - a bad media file costs its sample only
                    self._set_aside(skipped, source, e)
                    continue
                self.bad_in_a_row = 0
                decoded[-1].append(sample)
                kept.append((source, epoch))
        return decoded, kept

    def __iter__(self):
        state = self.state
        readers = [SlotReader(s, self.slot, self.slots, self.seed, Position(**state.positions[s.name]), self.resample,
                              state.remainder.get(s.name, ())) for s in self.sources]
        streams = [iter(r) for r in readers]
        skipped = dict(state.skipped)
        while True:
            rows, draws = self._chunk(streams, state, skipped)
            positions = {s.name: dict(vars(r.position)) for s, r in zip(self.sources, readers)}
            groups = [rows[i : i + self.rows] for i in range(0, len(rows), self.rows)]
            for g in range(state.delivered, len(groups)):
                decoded, kept = self._decode_rows(groups[g], skipped)
                last = g + 1 == len(groups)
                after = (LoaderState(positions, draws, state.chunk + 1, 0, dict(skipped), state.remainder) if last
                         else LoaderState(state.positions, state.draws, state.chunk, g + 1, dict(skipped),
                                          state.remainder))
                flat = [s for row in decoded for s in row]
                yield MicroBatch(
                    batch=collate_packed(decoded, self.max_len, self.pad_id),
                    ids=[s.id for s in flat], sources=dict(Counter(name for name, _ in kept)),
                    epochs=[e for _, e in kept],
                    real_tokens=sum(len(s) for s in flat), capacity=len(groups[g]) * self.max_len, state=after,
                )
            state = after


    def pending(self) -> tuple[list[dict], dict[str, tuple[list[dict], int]], dict[str, int]]:
        """What this slot has not delivered of its current epoch: (the samples of its current window not yet
        delivered, as {"source", "url", "key", "epoch"} in window order; per source the units its readers have not
        reached, and the epoch each reader is in; its set-aside counts). Re-reads the current window, as a resume
        does."""
        state = self.state
        readers = [SlotReader(s, self.slot, self.slots, self.seed, Position(**state.positions[s.name]), self.resample,
                              state.remainder.get(s.name, ())) for s in self.sources]
        window = []
        if state.delivered:
            rows, _ = self._chunk([iter(r) for r in readers], state, dict(state.skipped))
            groups = [rows[i : i + self.rows] for i in range(0, len(rows), self.rows)]
            window = [{"source": source, "url": raw["__url__"], "key": raw["__key__"], "epoch": epoch}
                      for group in groups[state.delivered:] for row in group for raw, source, epoch, _ in row]
        return (window, {s.name: (r.pending(), r.position.epoch) for s, r in zip(self.sources, readers)},
                dict(state.skipped))


class _Slots(torch.utils.data.IterableDataset):
    """The rank's slots as one IterableDataset: DataLoader worker k runs slot (first + k) % workers."""

    def __init__(self, loader: RankLoader, first: int):
        self.loader, self.first = loader, first

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        local = (self.first + (info.id if info else 0)) % self.loader.workers
        yield from ((local, mb) for mb in self.loader.stream(local))


class RankLoader:
    """Micro-batches of one data-parallel rank: `workers` slots (DataLoader worker processes) in a fixed
    round-robin. Its state is every slot's `LoaderState` plus which slot delivers next; on restore the slots are
    re-dealt to workers so that the round-robin continues where it stopped."""

    def __init__(self, sources: list[ShardSet], rank: int, world: int, workers: int, seed: int, max_len: int,
                 rows: int, chunk_samples: int, pad_id: int, max_bad_samples: int = 100, resample: bool = False,
                 speech: Speech = Speech.none):
        self.sources, self.rank, self.world, self.workers = sources, rank, world, max(1, workers)
        self.speech = speech
        self.use_processes = workers > 0
        self.seed, self.max_len, self.rows, self.chunk_samples, self.pad_id = seed, max_len, rows, chunk_samples, pad_id
        self.max_bad_samples, self.resample = max_bad_samples, resample
        self.states: list[LoaderState | None] = [None] * self.workers
        self.next_slot = 0

    def stream(self, local: int) -> SlotStream:
        return SlotStream(self.sources, self.rank * self.workers + local, self.world * self.workers, self.seed,
                          self.max_len, self.rows, self.chunk_samples, self.pad_id, self.states[local],
                          self.max_bad_samples, self.resample, self.speech)

    def __iter__(self):
        dataset = _Slots(self, self.next_slot)
        if self.use_processes:
            batches = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                                  multiprocessing_context="spawn", persistent_workers=False)
        else:
            batches = iter(dataset)
        for local, mb in batches:
            self.states[local] = mb.state
            self.next_slot = (local + 1) % self.workers
            yield mb

    def state_dict(self) -> dict:
        return {"rank": self.rank, "world": self.world, "workers": self.workers, "next_slot": self.next_slot,
                "slots": [None if s is None else vars(s) for s in self.states]}

    def redeal(self, states: list[dict]) -> None:
        """Continue from the loader states of every rank of a run with another layout (ranks x workers): each old
        slot's current epoch, less what it delivered, is dealt out to the new slots, exactly once. The samples of
        the old slots' current windows not yet delivered go round-robin, one by one; the rest of their epochs (the
        shard each reader was in, from its offset, and the shards after it) shard by shard. Each new slot reads its
        share first (`LoaderState.remainder`), then starts its own epochs after the latest old one. Every new rank
        computes the same deal (re-reading each old slot's current window); the corrupt-sample counts carry over
        to the first slot. What cannot be kept: the order within the epoch, which depends on the layout."""
        old_workers = states[0]["workers"]
        old_slots = states[0]["world"] * old_workers
        windows, pieces, skipped = [], {s.name: [] for s in self.sources}, Counter()
        last_epoch = dict.fromkeys(pieces, 0)
        for rank_state in sorted(states, key=lambda st: st.get("rank", 0)):
            for local, slot_state in enumerate(rank_state["slots"]):
                stream = SlotStream(self.sources, rank_state.get("rank", 0) * old_workers + local, old_slots,
                                    self.seed, self.max_len, self.rows, self.chunk_samples, self.pad_id,
                                    None if slot_state is None else LoaderState(**slot_state), self.max_bad_samples,
                                    self.resample, self.speech)
                window, pending, set_aside = stream.pending()
                windows += window
                skipped.update(set_aside)
                for name, (units, epoch) in pending.items():
                    pieces[name] += units
                    last_epoch[name] = max([last_epoch[name], epoch] + [u["epoch"] for u in units])
        for item in windows:
            last_epoch[item["source"]] = max(last_epoch[item["source"]], item["epoch"])
        slots = self.world * self.workers
        remainder = [{name: [] for name in pieces} for _ in range(slots)]
        keyed: list[dict[tuple, dict]] = [{} for _ in range(slots)]
        for t, item in enumerate(windows):  # one by one, each group of a shard's keys a unit
            unit = keyed[t % slots].setdefault((item["source"], item["url"], item["epoch"]), {
                "url": item["url"], "start": 0, "mod": 1, "rem": 0, "keys": [], "epoch": item["epoch"]})
            if not unit["keys"]:
                remainder[t % slots][item["source"]].append(unit)
            unit["keys"].append(item["key"])
        for name, units in pieces.items():
            for p, unit in enumerate(units):
                remainder[p % slots][name].append(unit)
        self.states = []
        for local in range(self.workers):
            slot = self.rank * self.workers + local
            self.states.append(LoaderState({name: vars(Position(epoch + 1)) for name, epoch in last_epoch.items()},
                                           skipped=dict(skipped) if slot == 0 else {}, remainder=remainder[slot]))
        self.next_slot = 0

    def load_state_dict(self, state: dict) -> None:
        if (state["world"], state["workers"]) != (self.world, self.workers):
            raise ConfigError(
                f"loader state was saved with {state['world']} ranks x {state['workers']} workers, this run has "
                f"{self.world} x {self.workers}: the sample order depends on both, so the resume would not be exact. "
                "Resume with the same layout, or start a new run from the export (model.path=...)"
            )
        self.states = [None if s is None else LoaderState(**s) for s in state["slots"]]
        self.next_slot = state["next_slot"]


def check_sources(sources, tokenizer, key: str = "data.sources") -> None:
    """Before any process starts: every source resolves to shards. A build directory must hold its index.json
    (made with `tokenizer`), at least one sample, and every shard its index lists; a glob or brace list must match
    a shard; URLs are taken as given (the loader sets an unreadable shard aside). One ConfigError naming the source."""
    from data_prep.build import load_index

    for source in sources:
        where = f"{key} {source.name} ({source.path})"
        path = Path(source.path)
        if path.is_dir():
            if not (path / "index.json").is_file():
                unfinished = " (an unfinished build: run the same omni-prep build again to finish it)" if (
                    path / "_progress.jsonl").is_file() else ""
                raise ConfigError(f"{where} has no index.json{unfinished}: prepare it with "
                                  f"`omni-prep build SOURCE {source.path}`")
            index = load_index(path, tokenizer)
            if not index["totals"]["samples"]:
                raise ConfigError(f"{where} holds no sample: its build set every record aside (reasons in "
                                  f"{path / 'rejects.jsonl'})")
            absent = [s["name"] for s in index["shards"] if not (path / s["name"]).is_file()]
            if absent:
                raise ConfigError(f"{where} lacks {len(absent)} shard(s) its index.json lists, e.g. {absent[0]}: "
                                  "copy the whole build directory")
        elif "://" not in source.path and not source.path.startswith("pipe:"):
            try:
                _expand(source.path)
            except ConfigError:
                raise ConfigError(f"{where} is neither a build directory nor a pattern that matches shard files: "
                                  f"give omni-prep build's output directory") from None


def check_speech(sources, need: Speech) -> None:
    """Before a Talker stage starts: every source whose index.json is at hand holds samples with the speech the
    stage needs, else one line naming it (without this, every sample would be set aside, one by one)."""
    if need == Speech.none:
        return
    kinds = ("speech", "speech_pair") if need == Speech.chosen else ("speech_pair",)
    for source in sources:
        index = Path(source.path) / "index.json"
        if not index.is_file():
            continue  # a glob or URLs: the loader's per-sample check still applies
        counts = json.loads(index.read_text())["totals"].get("modalities", {})
        if not any(counts.get(k, 0) for k in kinds):
            what = "speech codes (speech.chosen)" if need == Speech.chosen else "speech triplets (speech.chosen and .rejected)"
            raise ConfigError(f"data source {source.name} ({source.path}) has no samples with {what}; a Talker stage "
                              "trains on those: build them with omni-prep from records with `speech`")


def build_rank_loader(cfg, tokenizer, rank: int, world: int, seed: int, rows: int,
                      speech: Speech = Speech.none) -> RankLoader:
    """The loader of one rank from the `data` config group (omni_train.config.schema.DataConfig); `speech` is
    what the stage needs of every sample's speech: samples without it are set aside with that reason."""
    sources = [ShardSet.open(s.name, s.path, float(s.weight), tokenizer) for s in cfg.sources]
    return RankLoader(sources, rank, world, cfg.workers, seed, cfg.max_len, rows, cfg.chunk_samples,
                      tokenizer.pad_token_id, cfg.max_bad_samples, cfg.resample, speech)
