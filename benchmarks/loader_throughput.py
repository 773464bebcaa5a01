"""Loader throughput on the sample corpus, against on-the-fly preprocessing, and against what training consumes.

    .venv/bin/python benchmarks/loader_throughput.py [--seconds 20] [--train-metrics outputs/demo/sft/metrics.jsonl]

- ours: `RankLoader` over the prepared shards (decode FLAC -> log-mel, JPEG -> patches, pack, collate), in the
  training process itself (one core) and with 1 and 2 decoding worker processes; samples/s and real tokens/s,
  median of 1-s windows after warm-up.
- baseline, the processor path (public trainers' way, through transformers' Qwen2.5-Omni processor components):
  per sample from the raw manifest, decode the media files, run transformers' WhisperFeatureExtractor as
  Qwen2.5-Omni's processor does (128 bins, always padded to max length: 300 s, the released preprocessor's
  chunk_length; also at Whisper's 30 s for reference) and the Qwen2-VL image processor on images and every video
  frame, and tokenize the ChatML text; samples/s in one process. Ratio per core: ours in-process / baseline.
  (The processor class itself needs torchvision for video, which this project does not depend on.)
- keeps up: the loader's tokens/s with 2 workers against the median training tokens/s of a run (metrics.jsonl of
  the demo's ZeRO-3 stage, which trains 2 ranks: one rank's share is compared with one rank's loader).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import add_json_option, sample_corpus, write_figures


def _prepare() -> tuple[Path, Path]:
    return sample_corpus(Path(tempfile.mkdtemp(prefix="loader-bench-")), "shard_bytes=1000000")


def ours(shards: Path, workers: int, seconds: float) -> dict:
    from omni_train.data.loader import RankLoader, ShardSet

    loader = RankLoader([ShardSet.open("corpus", str(shards), 1.0)], rank=0, world=1, workers=workers, seed=0,
                        max_len=2048, rows=1, chunk_samples=256, pad_id=151643)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    windows, samples, tokens, window_start = [], 0, 0, time.perf_counter()
    end = window_start + seconds
    while time.perf_counter() < end:
        mb = next(it)
        samples, tokens = samples + len(mb.ids), tokens + mb.real_tokens
        now = time.perf_counter()
        if now - window_start >= 1.0:
            windows.append((samples / (now - window_start), tokens / (now - window_start)))
            samples, tokens, window_start = 0, 0, now
    it.close()  # shuts the worker processes down before the next measurement
    return {"samples_per_s": round(statistics.median(w[0] for w in windows), 1),
            "tokens_per_s": round(statistics.median(w[1] for w in windows), 1)}


def on_the_fly(manifest: Path, seconds: float, pad_seconds: int) -> dict:
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from data_prep.chatml import media_parts, render
    from data_prep.media import VisionBudget, load_audio, load_image, load_video
    from omni_train.tokenizer import load_tokenizer

    # Qwen2.5-Omni's released preprocessor: 128 bins, chunk_length 300 (n_samples 4.8M, nb_max_frames 30,000), and
    # its processor always pads to max_length
    audio_fe = WhisperFeatureExtractor(feature_size=128, chunk_length=pad_seconds)
    images = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)
    tokenizer, budget = load_tokenizer(), VisionBudget()
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    rng = np.random.default_rng(0)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        record = records[rng.integers(len(records))]
        for part in media_parts(record["messages"]):
            path = str(manifest.parent / part[part["type"]])
            if part["type"] == "audio":
                audio_fe(load_audio(path, 300), sampling_rate=16000, padding="max_length", return_attention_mask=True)
            elif part["type"] == "image":
                images(images=[load_image(path, budget)], return_tensors="np")
            else:
                video = load_video(path, budget, record.get("use_audio_in_video", False), 300)
                images(images=video.frames, return_tensors="np")
                if video.audio is not None:
                    audio_fe(video.audio, sampling_rate=16000, padding="max_length", return_attention_mask=True)
        tokenizer(render(record["messages"])[0])
        done += 1
    return {"samples_per_s": round(done / (time.perf_counter() - start), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--train-metrics", type=Path, default=Path("outputs/demo/sft/metrics.jsonl"))
    add_json_option(parser)
    args = parser.parse_args()
    manifest, shards = _prepare()
    result = {"machine": f"{os.cpu_count()} cores", "ours_in_process": ours(shards, 0, args.seconds),
              "ours_1_worker": ours(shards, 1, args.seconds), "ours_2_workers": ours(shards, 2, args.seconds),
              "processor_path_300s": on_the_fly(manifest, args.seconds, 300),
              "processor_path_30s": on_the_fly(manifest, args.seconds, 30)}
    for pad in (300, 30):
        result[f"ratio_per_core_vs_processor_path_{pad}s"] = round(
            result["ours_in_process"]["samples_per_s"] / result[f"processor_path_{pad}s"]["samples_per_s"], 2)
    if args.train_metrics.is_file():
        rows = [json.loads(line) for line in args.train_metrics.read_text().splitlines()]
        per_rank = statistics.median(r["tokens_per_s"] for r in rows) / 2  # the demo trains 2 ranks
        result["training_tokens_per_s_per_rank"] = round(per_rank, 1)
        result["loader_vs_training_ratio"] = round(result["ours_2_workers"]["tokens_per_s"] / per_rank, 2)
    print(json.dumps(result, indent=2))
    write_figures(args.json, "loader", result)


if __name__ == "__main__":
    main()
