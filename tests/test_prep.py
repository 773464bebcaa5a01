"""`omni-prep`: the sample corpus -> webdataset shards that plain webdataset reads, whose token layout and TMRoPE
positions equal transformers', with exact index/stats, byte-for-byte determinism, crash-safe resume, and bad
samples set aside with their reasons."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import webdataset as wds
from PIL import Image

from data_prep.build import build
from data_prep.chatml import render
from data_prep.config import from_overrides
from data_prep.layout import Media
from data_prep.media import VisionBudget, frame_indices, smart_resize
from omni_train.tokenizer import load_tokenizer, tokenizer_hash
from tests.conftest import REPO
from tests.oracle import transformers_layout


def _samples(shard_dir: Path) -> list[dict]:
    urls = [str(p) for p in sorted(shard_dir.glob("shard-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def _media(meta: list[dict]) -> list[Media]:
    return [Media(m["type"], audio_samples=m.get("audio_len", 0), grid_thw=tuple(m.get("grid_thw", (0, 0, 0))),
                  second_per_grid=m.get("second_per_grid", 1.0)) for m in meta]


def test_every_sample_equals_transformers_layout_and_positions(sample_shards):
    samples = _samples(sample_shards)
    assert len(samples) == 268
    kinds = Counter()
    for s in samples:
        info = s["json"]
        text, _ = render(info["messages"])
        want_ids, want_positions = transformers_layout(text, _media(info["media"]), info["use_audio_in_video"])
        assert s["input_ids.npy"].tolist() == want_ids.tolist(), info["id"]
        assert s["position_ids.npy"].tolist() == want_positions.tolist(), info["id"]
        labels = s["labels.npy"]
        assert labels.shape == want_ids.shape and (labels[labels != -100] == want_ids[labels != -100]).all()
        for i, m in enumerate(info["media"]):
            kinds[(m["type"], info["use_audio_in_video"])] += 1
            if m["type"] == "audio" or "audio_len" in m:
                assert f"m{i}.flac" in s
            if m["type"] == "video":
                assert sum(k.startswith(f"m{i}.") and k.endswith(".jpg") for k in s) == m["num_frames"]
                assert m["grid_thw"][0] * 2 == m["num_frames"]
        assert not any(k.endswith((".pyd", ".pickle", ".pth")) for k in s), "nothing in a shard is a pickle"
    # The corpus covers every layout the model knows.
    assert {("audio", False), ("image", False), ("video", False), ("video", True)} <= set(kinds)


def test_index_and_stats_match_the_shards(sample_shards):
    index = json.loads((sample_shards / "index.json").read_text())
    assert index["tokenizer_hash"] == tokenizer_hash(load_tokenizer())
    assert len(index["shards"]) >= 3  # the 2 MB bound really splits
    per_shard = {}
    for s in _samples(sample_shards):
        shard = Path(s["__url__"]).name
        entry = per_shard.setdefault(shard, {"samples": 0, "tokens": 0})
        entry["samples"] += 1
        entry["tokens"] += len(s["input_ids.npy"])
    for shard in index["shards"]:
        assert per_shard[shard["name"]] == {"samples": shard["samples"], "tokens": shard["tokens"]}
        assert (sample_shards / shard["name"]).stat().st_size <= 2_000_000 + 10240
    totals = index["totals"]
    assert totals["samples"] == 268 and totals["rejected"] == 0
    assert totals["modalities"] == {"audio": 52, "image": 44, "text": 160, "video": 16, "video_audio": 8}
    assert totals["media_seconds"]["video"] == pytest.approx(16 * 4.0)
    stats = (sample_shards / "stats.txt").read_text()
    assert "samples: 268 in" in stats and f"tokens: {totals['tokens']}" in stats


def test_image_grids_equal_qwen2vl_image_processor(sample_corpus, sample_shards):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)
    records = {json.loads(line)["id"]: json.loads(line) for line in sample_corpus.read_text().splitlines()}
    checked = 0
    for s in _samples(sample_shards):
        info = s["json"]
        if not info["id"].startswith("image-"):
            continue
        path = sample_corpus.parent / records[info["id"]]["messages"][0]["content"][0]["image"]
        want = processor(images=[Image.open(path).convert("RGB")], return_tensors="np")["image_grid_thw"][0]
        assert info["media"][0]["grid_thw"] == want.tolist()
        stored = Image.open(io.BytesIO(s["m0.jpg"]))
        assert (stored.height // 14, stored.width // 14) == tuple(want[1:])
        checked += 1
    assert checked == 40
    for h in range(20, 3000, 97):
        for w in (28, 100, 333, 1000, 4000):
            if max(h, w) / min(h, w) <= 200:
                assert smart_resize(h, w, 3136, 12845056) == hf_smart_resize(h, w, 28, 3136, 12845056), (h, w)


def _qwen_omni_utils():
    """qwen-omni-utils' own frame-count and resize rules, read from its source (its module imports torchvision)."""
    spec = importlib.util.find_spec("qwen_omni_utils")
    if spec is None:
        pytest.skip("qwen-omni-utils is not installed (launch/setup.sh installs it)")
    source = Path(spec.submodule_search_locations[0], "v2_5", "vision_process.py").read_text()
    tree = ast.parse(source)
    wanted = {"round_by_factor", "ceil_by_factor", "floor_by_factor", "smart_nframes", "smart_resize"}
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    keep += [n for n in tree.body if isinstance(n, ast.Assign) and not isinstance(n.value, ast.Dict)
             and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets)]
    namespace = {"math": math, "os": os, "logger": __import__("logging").getLogger("qou"), "Any": object,
                 "Dict": dict, "Union": object, "Optional": object, "Tuple": tuple}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "vision_process.py", "exec"), namespace)
    return namespace


def test_video_frames_follow_qwen_omni_utils(sample_corpus, sample_shards):
    import torch

    qou = _qwen_omni_utils()
    budget = VisionBudget()
    for total, fps in [(32, 8.0), (7, 30.0), (300, 29.97), (3000, 25.0), (5, 2.0), (100000, 30.0)]:
        n = qou["smart_nframes"]({"fps": 2.0}, total_frames=total, video_fps=fps)
        want = torch.linspace(0, total - 1, n).round().long().tolist()
        assert frame_indices(total, fps, budget).tolist() == want, (total, fps)
    for s in _samples(sample_shards):
        info = s["json"]
        if not info["id"].startswith("video-"):
            continue
        # Every corpus video: 4 s at 8 fps, 320 x 240.
        n = qou["smart_nframes"]({"fps": 2.0}, total_frames=32, video_fps=8.0)
        factor = 28
        min_pixels = 128 * factor * factor
        max_pixels = max(min(768 * factor * factor, 128000 * factor * factor * 0.9 / n * 2), int(min_pixels * 1.05))
        h, w = qou["smart_resize"](240, 320, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        assert info["media"][0]["grid_thw"] == [n // 2, h // 14, w // 14]
        assert info["media"][0]["second_per_grid"] == 1.0


def test_speech_is_resampled_to_16k_mono_keeping_its_duration(sample_corpus, sample_shards):
    import soundfile

    records = {json.loads(line)["id"]: json.loads(line) for line in sample_corpus.read_text().splitlines()}
    for s in _samples(sample_shards):
        info = s["json"]
        if not info["id"].startswith("speech-"):
            continue
        part = next(p for p in records[info["id"]]["messages"][0]["content"] if p["type"] == "audio")
        original, rate = soundfile.read(sample_corpus.parent / part["audio"])
        wave, stored_rate = soundfile.read(io.BytesIO(s["m0.flac"]))
        assert stored_rate == 16000 and wave.ndim == 1
        assert abs(len(wave) - len(original) * 16000 / rate) <= 2
        assert info["media"][0]["audio_len"] == len(wave)


def _tar_digests(shard_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shard_dir.glob("shard-*.tar"))}


def test_same_input_gives_the_same_bytes_whatever_the_worker_count(sample_corpus, sample_shards, tmp_path):
    build(str(sample_corpus), str(tmp_path), from_overrides(["workers=1", "shard_bytes=2000000"]), progress=False)
    assert _tar_digests(tmp_path) == _tar_digests(sample_shards)
    assert (tmp_path / "index.json").read_text() == (sample_shards / "index.json").read_text()


def test_killed_build_resumes_keeping_complete_shards_with_identical_bytes(sample_corpus, tmp_path):
    settings = ["workers=1", "shard_bytes=300000"]
    reference = tmp_path / "reference"
    build(str(sample_corpus), str(reference), from_overrides(settings), progress=False)
    out = tmp_path / "crashed"
    cmd = [sys.executable, "-m", "data_prep.cli", "build", str(sample_corpus), str(out), *settings, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "shard-000003.tar").exists():
        assert proc.poll() is None and time.time() < deadline, "build ended before it could be killed"
        time.sleep(0.02)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists(), "the build finished before it was killed"
    kept = {p.name: p.stat().st_ino for p in out.glob("shard-*.tar")}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.glob(".*.tmp"))
    assert _tar_digests(out) == _tar_digests(reference)
    for name, inode in kept.items():
        if name != max(kept):  # the newest may have been renamed just before its progress line was written
            assert (out / name).stat().st_ino == inode, f"complete shard {name} was rewritten"


def _silent_wav(path: Path) -> str:
    import soundfile

    soundfile.write(path, np.zeros(16000, np.float32), 16000)
    return path.name


def _mp4_without_audio(path: Path) -> str:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 10, np.uint8), format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path.name


def test_bad_lines_are_set_aside_with_their_reasons(sample_corpus, tmp_path):
    good = sample_corpus.read_text().splitlines()[:6]  # speech items
    (tmp_path / "garbage.png").write_text("not an image")
    long_text = " ".join(["word"] * 3000)

    def convo(*parts, use_audio_in_video=False, sid):
        return json.dumps({"id": sid, "use_audio_in_video": use_audio_in_video, "messages": [
            {"role": "user", "content": list(parts)}, {"role": "assistant", "content": "ok"}]})

    bad = [
        convo({"type": "audio", "audio": "missing.wav"}, sid="missing-file"),
        convo({"type": "image", "image": "garbage.png"}, sid="undecodable"),
        convo({"type": "audio", "audio": _silent_wav(tmp_path / "silent.wav")}, sid="silent"),
        convo({"type": "video", "video": _mp4_without_audio(tmp_path / "mute.mp4")}, use_audio_in_video=True,
              sid="video-without-audio"),
        json.dumps({"id": "no-assistant", "messages": [{"role": "user", "content": "hi"}]}),
        convo({"type": "text", "text": long_text}, sid="too-long"),
        '{"messages": [broken json',
    ]
    manifest = tmp_path / "manifest.jsonl"
    # Good lines refer to media relative to the corpus: rewrite their paths to absolute ones.
    good = [line.replace('"media/', f'"{sample_corpus.parent}/media/') for line in good]
    manifest.write_text("\n".join(good[:3] + bad + good[3:]) + "\n")
    out = tmp_path / "shards"
    index = build(str(manifest), str(out), from_overrides(["max_len=2048"]), progress=False)
    assert index["totals"]["samples"] == 6
    assert [s["json"]["id"] for s in _samples(out)] == [json.loads(line)["id"] for line in good]
    rejects = {r["id"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert "does not exist" in rejects["missing-file"]
    assert "cannot decode image" in rejects["undecodable"]
    assert "silent" in rejects["silent"]
    assert "no audio track" in rejects["video-without-audio"]
    assert "no assistant turn" in rejects["no-assistant"]
    assert "> max_len=2048" in rejects["too-long"]
    assert "bad JSON line" in rejects["manifest.jsonl:10"]
    assert len(rejects) == 7


def test_too_many_rejects_stop_the_build_with_one_clear_line(tmp_path):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"b{i}", "messages": [{"role": "user", "content": "x"}]}) + "\n"
                                for i in range(30)))
    result = subprocess.run([sys.executable, "-m", "data_prep.cli", "build", str(manifest), str(tmp_path / "o"),
                             "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "samples rejected (> max_reject_fraction=0.5)" in result.stderr
    assert "Traceback" not in result.stderr
    assert len((tmp_path / "o" / "rejects.jsonl").read_text().splitlines()) >= 20


def test_bad_setting_fails_with_one_clear_line(sample_corpus, tmp_path):
    for override, message in [("vision.fps=-1", "vision.fps=-1.0 must be positive"), ("fpss=2", "fpss")]:
        result = subprocess.run([sys.executable, "-m", "data_prep.cli", "build", str(sample_corpus),
                                 str(tmp_path / "o"), override], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_hugging_face_datasets_source_with_column_mapping(tmp_path):
    import datasets
    import soundfile

    buf = io.BytesIO()
    t = np.arange(24_000) / 16_000
    soundfile.write(buf, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16_000, format="WAV")
    ds = datasets.Dataset.from_dict({"clip": [{"bytes": buf.getvalue(), "path": None}] * 2,
                                     "transcript": ["a hum", "another hum"], "uid": ["u0", "u1"]})
    ds = ds.cast_column("clip", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "clips.parquet"))
    mapping = ["hf.audio=clip", "hf.response=transcript", "hf.id=uid", "hf.prompt_text=Transcribe the audio."]
    for source in (tmp_path / "hf", tmp_path / "clips.parquet"):
        out = tmp_path / f"shards-{source.name}"
        index = build(str(source), str(out), from_overrides(mapping), progress=False)
        assert index["totals"]["samples"] == 2
        first = _samples(out)[0]
        assert first["json"]["id"] == "u0" and first["json"]["media"] == [
            {"type": "audio", "audio_len": 24_000, "audio_tokens": 37}]  # 150 mel frames -> 75 -> 37
        assert first["json"]["messages"][0]["content"][0]["audio"] == "<bytes>"
        assert first["json"]["messages"][1]["content"] == "a hum"


def test_shards_made_with_another_tokenizer_are_refused(sample_shards, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from data_prep.build import load_index
    from omni_train.errors import ConfigError

    assert load_index(sample_shards, load_tokenizer())["totals"]["samples"] == 268
    load_tokenizer().save_pretrained(tmp_path / "tok")
    other = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    other.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    with pytest.raises(ConfigError, match="were made with tokenizer .* rebuild them"):
        load_index(sample_shards, other)


def test_without_espeak_the_corpus_has_synthetic_voiced_speech(tmp_path, monkeypatch):
    import data_prep.sample as sample

    monkeypatch.setattr(sample.shutil, "which", lambda name: None)
    manifest = sample.write_sample_corpus(tmp_path / "c", speech=4, images=0, videos=0, texts=0)
    index = build(str(manifest), str(tmp_path / "s"), from_overrides(["workers=1"]), progress=False)
    assert index["totals"]["rejected"] == 0
    assert index["totals"]["modalities"]["audio"] == 8  # 4 speech items + 4 mixed items
