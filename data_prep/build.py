"""`omni-prep build`: conversations -> webdataset tar shards, once, on CPU workers.

Owns: reading sources (JSONL manifests, a line at a time; a .json file's array; Hugging Face `datasets` directories
and parquet; records in one of data_prep.formats' formats, or built from columns by an `hf.*` mapping; media paths
relative to the source), turning each conversation into a model-ready sample (decoded and sized media, ChatML
tokens, labels, TMRoPE positions), setting aside bad samples with their reason, and writing size-bounded shards
plus `index.json` and `stats.txt`.

Guarantees: the same input and settings give the same bytes (samples are written in input order; tar headers carry
no time or owner); a crash leaves only complete shards (each is written under a temporary name and renamed); a
re-run keeps the complete shards and redoes the rest; nothing in a shard is a pickle.

A sample in a shard (key `sNNNNNNNNN`): `json` (id, source, messages, use_audio_in_video, media list, token count),
`input_ids.npy`, `labels.npy`, `position_ids.npy` (3 x L), int32, and its media at final size: `mI.flac` (16 kHz
audio, or a video's own track), `mI.jpg` (image), `mI.FFFF.jpg` (video frames). A record with `speech` (the
Talker's data: codec ids of the last assistant turn, a DPO triplet when it has `rejected`) adds
`speech.chosen.npy` / `speech.rejected.npy` and a json `speech` entry (speaker, reference log-probs).
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import sys
import tarfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.chatml import SampleError, encode, media_parts
from data_prep.config import PrepConfig
from data_prep.formats import MEDIA_LISTS, FormatError, detect, media_value, to_canonical
from data_prep.layout import SAMPLE_RATE, Media, audio_tokens
from data_prep.media import (
    MediaError,
    encode_flac,
    encode_jpeg,
    grid_thw,
    load_audio,
    load_image,
    load_video,
)
from omni_train.errors import ConfigError
from omni_train.files import write_json_atomic, write_text_atomic
from omni_train.tokenizer import load_tokenizer, tokenizer_hash
from omni_train.tokens import IGNORE

PROGRESS = "_progress.jsonl"
MIN_SAMPLES_BEFORE_STOPPING = 20
AUTO_LOOKAHEAD = 100  # records `format=auto` reads before it gives up on telling the format
WINDOW_PER_WORKER = 8  # records in flight per worker (in_order)


@dataclass
class Prepared:
    files: dict[str, bytes]
    tokens: int
    media_seconds: dict[str, float]
    modalities: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------- sources


def iter_records(source: str, cfg: PrepConfig) -> tuple[str | None, Iterator[tuple]]:
    """The format the source is read in (under `format=auto`, the first record's that shows one) and its records:
    (id, canonical record or None, base_dir, reason) in input order. A line or row that is not a record of that
    format yields the reason instead, so it can be set aside. The format is `None` only for a source with no
    record."""
    path = Path(source)
    rows = _rows(path, cfg)
    fmt = cfg.format
    if fmt == "auto":
        # Detection reads ahead a little and puts what it read back: the stream stays in input order.
        head = list(itertools.islice(rows, AUTO_LOOKAHEAD))
        fmt = next((f for _, row, _ in head if row is not None and (f := detect(row))), None)
        if fmt is None and head:
            raise ConfigError(
                f"{source}: none of its first {len(head)} records is in a known format (a 'messages' list, a "
                "'conversations' list, or 'instruction' and 'output'): fix the data or set format=")
        rows = itertools.chain(head, rows)
    return fmt, (_canonical(sid, row, error, fmt, path.parent) for sid, row, error in rows)


def _canonical(sid: str, row: dict | None, error: str | None, fmt: str, base_dir: Path) -> tuple:
    if error is not None:
        return sid, None, base_dir, error
    try:
        return sid, to_canonical(row, fmt), base_dir, None
    except FormatError as e:
        return sid, None, base_dir, str(e)


def _rows(path: Path, cfg: PrepConfig):
    """(id, row or None, reason) in input order: a JSONL manifest's lines (read one at a time), a .json file's
    array, or a `datasets` table's rows; under an hf.* column mapping, the record built from the row's columns."""
    if path.suffix in (".jsonl", ".json") and not path.is_file():
        raise ConfigError(f"source {path} does not exist")
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not _holds_array(path)):
        raw = _jsonl_rows(path)  # also JSON lines under a .json name, which `datasets` reads too
    elif path.suffix == ".json":
        raw = _json_array_rows(path)
    else:
        raw = _hf_rows(path, cfg)
    m = cfg.hf
    for sid, row, error in raw:
        if error is not None:
            yield sid, None, error
            continue
        try:
            sid = str(row[m.id]) if m.id else str(row["id"]) if row.get("id") is not None else sid
            record = _row_to_record(row, m) if m.maps_columns() else row
        except (KeyError, TypeError) as e:
            yield sid, None, f"row does not fit the hf column mapping: {e!r}"
            continue
        yield sid, record, None


def _jsonl_rows(path: Path):
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            sid = f"{path.name}:{line_no}"
            try:
                row = json.loads(line)
            except ValueError as e:
                yield sid, None, f"bad JSON line: {e}"
                continue
            yield (sid, row, None) if isinstance(row, dict) else (sid, None, "bad JSON line: not an object")


def _holds_array(path: Path) -> bool:
    """Whether a .json file is one JSON array (its first character but whitespace is `[`), not JSON lines."""
    with path.open() as f:
        while (c := f.read(1)).isspace():
            pass
    return c == "["


def _json_array_rows(path: Path):
    try:
        rows = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not a JSON array of records: {e}") from None
    for i, row in enumerate(rows):
        yield (f"{path.name}:{i}", row, None) if isinstance(row, dict) else (
            f"{path.name}:{i}", None, "bad JSON record: not an object")


def _hf_rows(path: Path, cfg: PrepConfig):
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.hf.split]
    elif path.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(path), split=cfg.hf.split)
    else:
        raise ConfigError(f"source {path}: expected a .jsonl manifest, a .json file, a datasets directory or .parquet")
    m = cfg.hf
    # Media stay undecoded (bytes or path): decoding is ours, with the same code as for manifests.
    for col, feature in ((m.audio, datasets.Audio(decode=False)), (m.image, datasets.Image(decode=False))):
        if col is not None:
            if col not in ds.column_names:
                raise ConfigError(f"hf.{'audio' if col == m.audio else 'image'}={col} is not a column of {path}")
            ds = ds.cast_column(col, feature)
    for col in MEDIA_LISTS.values():  # the record formats' media lists, as lists of Audio/Image/Video cells
        cell = getattr(ds.features.get(col), "feature", None)
        if isinstance(cell, (datasets.Audio, datasets.Image, datasets.Video)):
            ds = ds.cast_column(col, datasets.List(type(cell)(decode=False)))
    for i, row in enumerate(ds):
        yield f"{path.name}:{i}", row, None


def _row_to_record(row: dict, m) -> dict:
    if m.messages:
        return {"messages": row[m.messages], "use_audio_in_video": bool(row.get("use_audio_in_video", False))}
    user: list[dict] = []
    for kind, col in (("audio", m.audio), ("image", m.image)):
        if col is not None:
            user.append({"type": kind, kind: media_value(row[col])})
    text = row[m.prompt] if m.prompt else m.prompt_text
    if text:
        user.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": row[m.response]}]}


# ---------------------------------------------------------------------------------------------------- samples


def _media_ref(ref, base_dir: Path):
    """A media reference: a path (relative to the manifest) or raw bytes (from a datasets column)."""
    if isinstance(ref, bytes):
        return io.BytesIO(ref)
    if not isinstance(ref, str):
        raise MediaError(f"media reference {ref!r} is neither a path nor bytes")
    path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
    if not path.is_file():
        raise MediaError(f"media file {path} does not exist")
    return str(path)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.astype(np.int32), allow_pickle=False)
    return buf.getvalue()


def prepare(sid: str, record: dict, base_dir: Path, cfg: PrepConfig, tokenizer, source_name: str = "") -> Prepared:
    """One conversation -> the files of its shard sample. Raises SampleError (with the reason) for a bad one."""
    budget = cfg.vision
    messages = record["messages"]
    use_audio_in_video = bool(record.get("use_audio_in_video", False))
    files: dict[str, bytes] = {}
    media, meta = [], []
    seconds: dict[str, float] = defaultdict(float)
    for i, part in enumerate(media_parts(messages)):
        kind = part["type"]
        if kind not in part:
            raise SampleError(f"{kind} part without a '{kind}' field")
        ref = _media_ref(part[kind], base_dir)
        if kind == "audio":
            wave = load_audio(ref, cfg.max_audio_seconds)
            files[f"m{i}.flac"] = encode_flac(wave)
            media.append(Media("audio", audio_samples=wave.size))
            meta.append({"type": "audio", "audio_len": wave.size, "audio_tokens": audio_tokens(wave.size)})
            seconds["audio"] += wave.size / SAMPLE_RATE
        elif kind == "image":
            image = load_image(ref, budget)
            files[f"m{i}.jpg"] = encode_jpeg(image, cfg.jpeg_quality)
            grid = grid_thw(1, image.height, image.width)
            media.append(Media("image", grid_thw=grid))
            meta.append({"type": "image", "grid_thw": list(grid)})
        else:
            video = load_video(ref, budget, use_audio_in_video, cfg.max_audio_seconds)
            for j, frame in enumerate(video.frames):
                files[f"m{i}.{j:04d}.jpg"] = encode_jpeg(frame, cfg.jpeg_quality)
            grid = grid_thw(len(video.frames), video.frames[0].height, video.frames[0].width)
            item = {"type": "video", "grid_thw": list(grid), "second_per_grid": video.second_per_grid,
                    "num_frames": len(video.frames)}
            samples = 0
            if video.audio is not None:
                files[f"m{i}.flac"] = encode_flac(video.audio)
                samples = video.audio.size
                item.update(audio_len=samples, audio_tokens=audio_tokens(samples))
                seconds["video_audio"] += samples / SAMPLE_RATE
            media.append(Media("video", audio_samples=samples, grid_thw=grid, second_per_grid=video.second_per_grid))
            meta.append(item)
            seconds["video"] += len(video.frames) / budget.fps
    enc = encode(messages, tokenizer, media, use_audio_in_video)
    n = len(enc["input_ids"])
    if n > cfg.max_len:
        raise SampleError(f"{n} tokens > max_len={cfg.max_len} (media spans are never cut)")
    if not (enc["labels"] != IGNORE).any():
        raise SampleError("no assistant token carries a label")
    info = {"id": sid, "source": source_name, "messages": _without_bytes(messages),
            "use_audio_in_video": use_audio_in_video, "media": meta, "num_tokens": n}
    if record.get("speech") is not None:
        info["speech"] = _speech(record["speech"], messages, files)
    files["json"] = json.dumps(info, sort_keys=True).encode()
    files["input_ids.npy"] = _npy(enc["input_ids"])
    files["labels.npy"] = _npy(enc["labels"])
    files["position_ids.npy"] = _npy(enc["position_ids"])
    modalities = tuple(sorted({m["type"] for m in meta} | ({"video_audio"} if use_audio_in_video and any(
        m["type"] == "video" for m in meta) else set()))) or ("text",)
    if "speech" in info:  # counted in index.json, so a Talker stage can check its sources before it starts
        modalities += ("speech_pair",) if "speech.rejected.npy" in files else ("speech",)
    return Prepared(files, n, dict(seconds), modalities)


CODEC_IDS = 8292  # codec ids below the Talker's special ids (pad 8292, bos 8293, eos 8294, mask 8296)


def _speech(speech, messages: list[dict], files: dict[str, bytes]) -> dict:
    """A record's `speech` (the last assistant turn, spoken): codec ids `chosen` (required), `rejected` (a DPO
    triplet), `speaker` (a key of the model's spk_dict.pt) and `ref_logps` ([chosen, rejected] reference
    log-probs, precomputed). The codes go to `speech.chosen.npy` / `speech.rejected.npy`; the rest to the json."""
    if not isinstance(speech, dict) or "chosen" not in speech:
        raise SampleError("speech must be an object with 'chosen' codec ids (and 'rejected' for a DPO triplet)")
    if messages[-1].get("role") != "assistant":
        raise SampleError("a sample with speech must end with the assistant turn it speaks")
    out = {}
    for kind in ("chosen", "rejected"):
        if speech.get(kind) is None:
            continue
        codes = speech[kind]
        if not isinstance(codes, list) or not codes or not all(isinstance(c, int) and 0 <= c < CODEC_IDS
                                                                 for c in codes):
            raise SampleError(f"speech.{kind} must be a non-empty list of codec ids in [0, {CODEC_IDS})")
        files[f"speech.{kind}.npy"] = _npy(np.asarray(codes))
    if "speaker" in speech:
        if not isinstance(speech["speaker"], str):
            raise SampleError("speech.speaker must be a speaker name (a key of the model's spk_dict.pt)")
        out["speaker"] = speech["speaker"]
    if speech.get("ref_logps") is not None:
        ref = speech["ref_logps"]
        if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, (int, float)) and x <= 0 for x in ref)):
            raise SampleError("speech.ref_logps must be [chosen, rejected] summed log-probs (<= 0)")
        if speech.get("rejected") is None:
            raise SampleError("speech.ref_logps needs a rejected sequence")
        out["ref_logps"] = [float(x) for x in ref]
    return out


def _without_bytes(messages: list[dict]) -> list[dict]:
    """The conversation as stored in the sample's json: media given as raw bytes become "<bytes>"."""
    def part(p):
        return {**p, p["type"]: "<bytes>"} if isinstance(p.get(p["type"]), bytes) else p

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


_worker_state: dict = {}


def _init_worker(cfg: PrepConfig, tokenizer, source_name: str) -> None:
    _worker_state.update(cfg=cfg, tokenizer=tokenizer, source_name=source_name)


def _pool_context():
    """Forked workers inherit the parent's loaded tokenizer (spawned ones would each load it again, ~1.5 s, and
    import the project, ~1 s: most of a small build). The build never imports torch, whose threads would make a
    fork unsafe; where fork does not exist, spawn (the tokenizer then travels pickled)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust pool must not be running across a fork
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _work(item):
    sid, record, base_dir, error = item
    if error is not None:
        return sid, None, error
    try:
        s = _worker_state
        return sid, prepare(sid, record, base_dir, s["cfg"], s["tokenizer"], s["source_name"]), None
    except SampleError as e:
        return sid, None, str(e)
    except (KeyError, TypeError, AttributeError) as e:
        return sid, None, f"malformed conversation: {e!r}"


# ---------------------------------------------------------------------------------------------------- shards


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    # TarFile keeps every member's TarInfo it wrote (for getmembers), ~75 bytes each: a 512-MB shard of text samples
    # holds 800,000 members, 60 MB that grew with the manifest. Nothing here reads them back.
    tar.members.clear()


@dataclass
class _Shard:
    name: str
    samples: int = 0
    bytes: int = 0
    tokens: int = 0
    media_seconds: dict = field(default_factory=lambda: defaultdict(float))
    modalities: Counter = field(default_factory=Counter)
    rejects: list = field(default_factory=list)


class ShardWriter:
    """Appends samples to `shard-NNNNNN.tar`, starting a new shard when the next sample would pass the bound."""

    def __init__(self, out_dir: Path, shard_bytes: int, first_index: int, first_sample: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.index, self.next_sample = first_index, first_sample
        self.tar = self.current = None

    def _open(self) -> None:
        self.current = _Shard(f"shard-{self.index:06d}.tar")
        self.tar = tarfile.open(self.out_dir / f".{self.current.name}.tmp", "w", format=tarfile.USTAR_FORMAT)

    def add(self, prepared: Prepared, on_close) -> None:
        size = sum(len(v) + 1024 for v in prepared.files.values())
        if self.current is not None and self.current.samples and self.current.bytes + size > self.shard_bytes:
            self.close(on_close)
        if self.current is None:
            self._open()
        key = f"s{self.next_sample:09d}"
        for ext, data in sorted(prepared.files.items()):
            _tar_member(self.tar, f"{key}.{ext}", data)
        self.next_sample += 1
        s = self.current
        s.samples, s.bytes, s.tokens = s.samples + 1, s.bytes + size, s.tokens + prepared.tokens
        for k, v in prepared.media_seconds.items():
            s.media_seconds[k] += v
        s.modalities.update(prepared.modalities)

    def reject(self, sid: str, reason: str) -> None:
        if self.current is None:
            self._open()
        self.current.rejects.append({"id": sid, "reason": reason})

    def close(self, on_close) -> None:
        if self.current is None:
            return
        self.tar.close()
        tmp = self.out_dir / f".{self.current.name}.tmp"
        if self.current.samples:
            tmp.rename(self.out_dir / self.current.name)
            self.index += 1
        else:
            tmp.unlink()
        on_close(self.current)
        self.current = self.tar = None


# ---------------------------------------------------------------------------------------------------- build


def _read_progress(out_dir: Path, header: dict) -> list[dict]:
    """Entries of complete shards from an earlier run with the same settings; stray files are removed."""
    path = out_dir / PROGRESS
    entries: list[dict] = []
    if path.is_file():
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines and lines[0] != header:
            raise ConfigError(f"{out_dir} holds a build with other settings or another tokenizer: use a new output "
                              "directory or delete it")
        for entry in lines[1:]:
            if entry["samples"] and not (out_dir / entry["name"]).is_file():
                break
            entries.append(entry)
    kept = {e["name"] for e in entries}
    for stray in [*out_dir.glob(".shard-*.tmp"), *out_dir.glob("shard-*.tar")]:
        if stray.name not in kept:
            stray.unlink()
    write_text_atomic(path, "".join(json.dumps(x) + "\n" for x in [header, *entries]))
    return entries


def part_dir(out_dir: str | Path, i: int, n: int) -> Path:
    return Path(out_dir) / f"part-{i}-of-{n}"


def build(source: str, out_dir: str, cfg: PrepConfig, tokenizer_path: str | None = None, progress: bool = True) -> dict:
    """Prepare every conversation of `source` (with `cfg.part` I/N, those whose index is I modulo N, into
    OUT_DIR/part-I-of-N) into shards; returns the index."""
    part = cfg.parts()
    out = part_dir(out_dir, *part) if part else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_path)
    header = {"source": str(Path(source).resolve()), "tokenizer_hash": tokenizer_hash(tokenizer),
              "config": cfg.fingerprint(), **({"part": list(part)} if part else {})}
    entries = _read_progress(out, header)
    done_items = sum(e["samples"] + len(e["rejects"]) for e in entries)
    writer = ShardWriter(out, cfg.shard_bytes, first_index=sum(1 for e in entries if e["samples"]),
                         first_sample=sum(e["samples"] for e in entries))
    seen, rejected = done_items, sum(len(e["rejects"]) for e in entries)

    def on_close(shard: _Shard) -> None:
        entry = {"name": shard.name if shard.samples else None, "samples": shard.samples, "tokens": shard.tokens,
                 "bytes": shard.bytes, "media_seconds": dict(shard.media_seconds),
                 "modalities": dict(shard.modalities), "rejects": shard.rejects}
        entries.append(entry)
        with (out / PROGRESS).open("a") as f:
            f.write(json.dumps(entry) + "\n")

    fmt, records = iter_records(source, cfg)
    if part:
        records = itertools.islice(records, part[0], None, part[1])
    for _ in range(done_items):
        next(records)
    started = time.perf_counter()
    pool = _pool_context().Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, tokenizer, Path(source).name))
    with pool:
        bar = _progress_bar(progress, source, done_items, part)  # after the fork: tqdm's monitor is a thread
        for sid, prepared, reason in in_order(pool, _work, records, window=WINDOW_PER_WORKER * cfg.workers):
            seen += 1
            if prepared is None:
                rejected += 1
                writer.reject(sid, reason)
            else:
                writer.add(prepared, on_close)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rejected=rejected, refresh=False)
            if seen >= MIN_SAMPLES_BEFORE_STOPPING and rejected / seen > cfg.max_reject_fraction:
                writer.close(on_close)
                _write_rejects(out, entries)
                raise ConfigError(
                    f"{rejected} of {seen} samples rejected (> max_reject_fraction={cfg.max_reject_fraction}); reasons "
                    f"in {out / 'rejects.jsonl'}. Fix the data or raise max_reject_fraction; a re-run resumes"
                )
    writer.close(on_close)
    if bar is not None:
        bar.close()
    index = _write_index(out, header, entries)
    elapsed = time.perf_counter() - started
    reading = f"format=auto read {fmt or 'no'} records" if cfg.format == "auto" else f"format={fmt}"
    t = index["totals"]
    print(f"omni-prep: {reading}, {t['samples']} samples in {len(index['shards'])} shards, "
          f"{sum(t['media_seconds'].values()) / 3600:.2f} media hours, {t['rejected']} rejected "
          f"({out / 'rejects.jsonl'}), {elapsed:.1f} s ({(seen - done_items) / max(elapsed, 1e-9):.1f} samples/s)",
          file=sys.stderr)
    if not index["totals"]["samples"]:
        reasons = index["reject_reasons"]
        common = max(reasons, key=reasons.get) if reasons else None
        raise ConfigError(f"{source} gave no sample: " + (
            f"all {index['totals']['rejected']} records were set aside, most often for \"{common}\" "
            f"({reasons[common]}; all reasons in {out / 'rejects.jsonl'})" if common else "it holds no record"))
    return index


def load_index(shard_dir: str | Path, tokenizer) -> dict:
    """The index of a finished build, checked against the tokenizer that will read it."""
    path = Path(shard_dir) / "index.json"
    if not path.is_file():
        raise ConfigError(f"{shard_dir} has no index.json: build it with `omni-prep build SOURCE {shard_dir}`")
    index = json.loads(path.read_text())
    if index["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise ConfigError(
            f"shards in {shard_dir} were made with tokenizer {index['tokenizer_hash']}, but this model's is "
            f"{tokenizer_hash(tokenizer)}: rebuild them with `omni-prep build ... --tokenizer MODEL_PATH`"
        )
    return index


def _progress_bar(enabled: bool, source: str, done: int, part: tuple[int, int] | None):
    """tqdm over the records, with their total (and so an ETA) for a JSONL manifest: its non-blank lines (a part's
    share of them), counted in one streaming pass over its bytes (about a second per GB)."""
    if not enabled:
        return None
    from tqdm import tqdm

    total = None
    if Path(source).suffix == ".jsonl":
        with open(source, "rb") as f:
            total = sum(1 for line in f if line.strip())
        if part:
            total = len(range(part[0], total, part[1]))
    return tqdm(desc="prep" + (f" part {part[0]}/{part[1]}" if part else ""), unit="sample", dynamic_ncols=True,
                total=total, initial=done)


def in_order(pool, fn, items, window: int):
    """`pool.imap(fn, items)` with at most `window` items read ahead of the results taken: memory stays bounded
    by the window, whatever the source's size (a result the writer has not taken yet holds its media bytes)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _write_rejects(out: Path, entries: list[dict]) -> list[dict]:
    rejects = [r for e in entries for r in e["rejects"]]
    write_text_atomic(out / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
    return rejects


def _write_index(out: Path, header: dict, entries: list[dict]) -> dict:
    rejects = _write_rejects(out, entries)
    shards = [{k: e[k] for k in ("name", "samples", "tokens", "bytes", "media_seconds", "modalities")}
              for e in entries if e["samples"]]
    return write_index(out, header, shards, rejects)


def write_index(out: Path, header: dict, shards: list[dict], rejects: list[dict]) -> dict:
    """index.json (the header, the shards with their paths relative to `out`, totals, reject reasons) and
    stats.txt, of a build or of merged parts (data_prep/parts.py)."""
    totals = {"samples": sum(s["samples"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
              "rejected": len(rejects), "media_seconds": {}, "modalities": {}}
    for s in shards:
        for key in ("media_seconds", "modalities"):
            for k, v in s[key].items():
                totals[key][k] = totals[key].get(k, 0) + v
    reasons = Counter(r["reason"].split(":")[0] for r in rejects)
    index = {**header, "shards": shards, "totals": totals, "reject_reasons": dict(reasons)}
    write_json_atomic(out / "index.json", index)
    write_text_atomic(out / "stats.txt", _stats_text(index))
    return index


def _stats_text(index: dict) -> str:
    t = index["totals"]
    lines = [f"source: {index['source']}", f"tokenizer: {index['tokenizer_hash']}",
             f"samples: {t['samples']} in {len(index['shards'])} shards; rejected: {t['rejected']}",
             f"tokens: {t['tokens']} (mean {t['tokens'] / max(1, t['samples']):.0f} per sample)", "",
             "samples per modality:"]
    lines += [f"  {k:12s} {v}" for k, v in sorted(t["modalities"].items())]
    lines += ["", "media seconds:"] + [f"  {k:12s} {v:.1f}" for k, v in sorted(t["media_seconds"].items())]
    if index["reject_reasons"]:
        lines += ["", "reject reasons:"] + [f"  {v:5d}  {k}" for k, v in sorted(index["reject_reasons"].items())]
    lines += ["", "per shard: name samples tokens bytes"]
    lines += [f"  {s['name']} {s['samples']} {s['tokens']} {s['bytes']}" for s in index["shards"]]
    return "\n".join(lines) + "\n"
