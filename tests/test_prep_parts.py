"""A build in parts: part=I/N builds, the local launcher and a SLURM job array, the merge, and the loader reading
merged parts as one build; the build's read-ahead stays bounded whatever the source's size."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import webdataset as wds

from tests.conftest import REPO

SETTINGS = ["workers=2", "shard_bytes=2000000"]  # conftest's sample_shards: the single build compared against


def _samples(shard_dir: Path) -> dict[str, dict[str, str]]:
    """Every sample of a build (or of merged parts), in its index's shard order, by id: the digest of each member
    (tokens, labels, positions, media bytes, its json); the webdataset key, which numbers the samples of a part,
    left out."""
    index = json.loads((shard_dir / "index.json").read_text())
    urls = [str(shard_dir / s["name"]) for s in index["shards"]]
    return {json.loads(raw["json"])["id"]: {k: hashlib.sha256(v).hexdigest() for k, v in raw.items()
                                            if not k.startswith("__")}
            for raw in wds.WebDataset(urls, shardshuffle=False)}


def _prep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_three_parts_run_here_and_merged_hold_the_samples_of_one_build(sample_corpus, sample_shards, tmp_path):
    out = tmp_path / "parts"
    done = _prep("build", str(sample_corpus), str(out), *SETTINGS, "workers=1", "launcher=local",
                 "launcher.array=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "omni-prep: merged 3 parts:" in done.stderr
    whole, merged = json.loads((sample_shards / "index.json").read_text()), json.loads((out / "index.json").read_text())
    assert merged["parts"] == 3 and merged["tokenizer_hash"] == whole["tokenizer_hash"]
    assert merged["totals"] == whole["totals"] and merged["reject_reasons"] == whole["reject_reasons"]
    parts = _samples(out)
    assert parts == _samples(sample_shards)  # ids, tokens, positions, media bytes
    # The parts are the records whose index is I modulo 3: balanced and disjoint.
    sizes = [json.loads((out / f"part-{i}-of-3" / "index.json").read_text())["totals"]["samples"] for i in range(3)]
    assert sum(sizes) == len(parts) and max(sizes) - min(sizes) <= 2 + whole["totals"]["rejected"], sizes
    # The loader takes the merged directory as it takes one build.
    from omni_train.data.loader import _expand

    assert _expand(str(out)) == [str(out / s["name"]) for s in merged["shards"]]
    assert all(s["name"].startswith("part-") for s in merged["shards"])

    # Part 1 killed with SIGKILL mid-way, then resumed: byte-identical to the part built in one go.
    again = tmp_path / "again"
    cmd = [sys.executable, "-m", "data_prep.cli", "build", str(sample_corpus), str(again), *SETTINGS, "workers=1",
           "part=1/3", "shard_bytes=300000", "--no-progress"]
    reference = [sys.executable, "-m", "data_prep.cli", "build", str(sample_corpus), str(tmp_path / "ref"),
                 *SETTINGS, "workers=1", "part=1/3", "shard_bytes=300000", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (again / "part-1-of-3" / "shard-000001.tar").exists():
        assert proc.poll() is None and time.time() < deadline, "the part ended before it could be killed"
        time.sleep(0.02)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (again / "part-1-of-3" / "index.json").exists(), "the part finished before it was killed"
    assert subprocess.run(reference, cwd=REPO, capture_output=True, timeout=600).returncode == 0
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=600).returncode == 0
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted((tmp_path / "ref" / "part-1-of-3").glob("shard-*.tar"))}
    assert digest and digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                 for p in sorted((again / "part-1-of-3").glob("shard-*.tar"))}


def test_the_merge_names_a_missing_or_unfinished_part_in_one_line(sample_corpus, tmp_path):
    from data_prep.build import build
    from data_prep.config import from_overrides
    from data_prep.parts import merge
    from omni_train.errors import ConfigError

    text = sample_corpus.with_name("text.jsonl")
    for i in (0, 2):
        build(str(text), str(tmp_path), from_overrides(["workers=1", f"part={i}/3"]), progress=False)
    try:
        merge(tmp_path)
        raise AssertionError("merged without part 1")
    except ConfigError as e:
        assert str(e).startswith("part 1 of 3 is missing") and "part=1/3" in str(e), e
    (tmp_path / "part-1-of-3").mkdir()
    (tmp_path / "part-1-of-3" / "_progress.jsonl").write_text("{}\n")
    try:
        merge(tmp_path)
        raise AssertionError("merged an unfinished part")
    except ConfigError as e:
        assert "part 1 of 3 is unfinished (a re-run resumes it)" in str(e), e
    assert not (tmp_path / "index.json").exists()


def test_a_build_reads_a_bounded_window_ahead_of_the_shards_it_writes():
    """The source is read as the results are taken, never whole: at most `window` records ahead (Pool.imap would
    read ahead as fast as the pipe takes them)."""
    import multiprocessing

    from data_prep.build import in_order

    pulled = 0

    def source():
        nonlocal pulled
        for i in range(2000):
            pulled += 1
            yield i

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for taken, result in enumerate(in_order(pool, abs, source(), window=16), 1):
            assert result == taken - 1  # in input order
            assert pulled - taken <= 16, (pulled, taken)
    assert taken == 2000


def _late_rss_mb(cmd: list[str]) -> float:
    """A command's own resident memory near its end (the last sample, every 10 ms, before it exited): what the
    build holds after its records, not the start-up's passing peak (the tokenizer's load), which would hide
    growth smaller than it."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last, process = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            last = process.memory_info().rss or last  # 0 once it has exited, before it is reaped
        except psutil.Error:
            pass
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    return last / 2**20


def test_a_builds_memory_does_not_grow_with_the_manifest(tmp_path):
    """Text manifests of 4,000 and 40,000 lines (12-word turns), one worker: what the build holds at its end differs
    by less than 2.5 MB (0.1 to 0.7 MB measured; 4 MB while the TarFile kept every member it wrote, 60 MB at
    200,000 lines; benchmarks/prep_scale.py measures the peak at 20,000 and 200,000 lines)."""
    import random

    words = "apple river stone cloud music garden silver window yellow forest candle market".split()
    rng = random.Random(0)
    held = {}
    for lines in (4_000, 40_000):
        manifest = tmp_path / f"m{lines}.jsonl"
        manifest.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": " ".join(rng.choices(words, k=12))},
            {"role": "assistant", "content": " ".join(rng.choices(words, k=12))}]}) + "\n" for _ in range(lines)))
        held[lines] = _late_rss_mb([sys.executable, "-m", "data_prep.cli", "build", str(manifest),
                                     str(tmp_path / f"o{lines}"), "workers=1", "--no-progress"])
    assert held[40_000] - held[4_000] < 2.5, held
