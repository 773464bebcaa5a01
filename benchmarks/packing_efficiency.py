"""Packing efficiency (real tokens / row capacity) at 8192 and 32768 tokens, against a padded baseline.

    .venv/bin/python benchmarks/packing_efficiency.py [--shards DIR]

Two length distributions: the sample corpus's real sample lengths (from its shards; built on the spot when no
--shards is given), and a synthetic mixture shaped like the paper's stage-2 data (image-text, video, audio,
video-with-audio, text; lognormal lengths per kind). Packing: `omni_train.data.batch.best_fit` over shuffle windows of
`--window` samples, as the loader does. Baseline: the same samples in micro-batches of 8, each padded to its
longest sample (what a padded, unpacked trainer computes on).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from common import add_json_option, sample_shards, write_figures

from omni_train.data.batch import best_fit


def packed(lengths: list[int], capacity: int, window: int) -> float:
    real = rows = 0
    for start in range(0, len(lengths), window):
        chunk = [n for n in lengths[start : start + window] if n <= capacity]
        rows += len(best_fit(chunk, capacity))
        real += sum(chunk)
    return real / (rows * capacity)


def padded(lengths: list[int], batch: int = 8) -> float:
    real = cap = 0
    for start in range(0, len(lengths), batch):
        chunk = lengths[start : start + batch]
        real, cap = real + sum(chunk), cap + len(chunk) * max(chunk)
    return real / cap


def paper_like(n: int, seed: int = 0) -> list[int]:
    """Token lengths of a stage-2-like mixture (median lengths per kind are assumptions, not from the paper)."""
    rng = np.random.default_rng(seed)
    kinds = {"image_text": (0.45, 900), "video": (0.2, 3000), "audio": (0.2, 700), "video_audio": (0.05, 4500),
             "text": (0.10, 600)}
    names = list(kinds)
    picks = rng.choice(len(names), size=n, p=[kinds[k][0] for k in names])
    return [int(max(16, rng.lognormal(np.log(kinds[names[k]][1]), 0.7))) for k in picks]


def corpus_lengths(shards: Path | None) -> list[int]:
    shards = sample_shards(shards, Path(tempfile.mkdtemp(prefix="pack-bench-")))
    import webdataset as wds

    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    return [json.loads(s["json"])["num_tokens"] for s in wds.WebDataset(urls, shardshuffle=False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--window", type=int, default=1024)
    add_json_option(parser)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    corpus = corpus_lengths(args.shards)
    # The sample corpus is small: repeat it, shuffled, to fill 32k rows many times over.
    corpus = [corpus[i] for i in rng.permutation(len(corpus) * 40) % len(corpus)]
    report = {}
    for name, lengths in (("sample_corpus", corpus), ("paper_like_mixture", paper_like(20_000))):
        report[name] = {"samples": len(lengths), "mean_tokens": round(float(np.mean(lengths)), 1),
                        "padded_baseline": round(padded(lengths), 4)}
        for capacity in (8192, 32768):
            eff = packed(lengths, capacity, args.window)
            report[name][f"packed_{capacity}"] = round(eff, 4)
            report[name][f"ratio_vs_padded_{capacity}"] = round(eff / padded(lengths), 2)
    print(json.dumps({"window": args.window, **report}, indent=2))
    write_figures(args.json, "packing", report)


if __name__ == "__main__":
    main()
