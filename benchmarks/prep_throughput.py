"""Data-prep throughput on the sample corpus: samples/s and audio-seconds/s, per worker, for 1 and 2 workers.

    .venv/bin/python benchmarks/prep_throughput.py [--repeats 3]

Each configuration builds the whole corpus into a fresh directory `repeats` times; the median wall time is
reported (tokenizer loading in the workers included, as a real build pays it). The 1-worker run is the baseline
for the scaling ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import add_json_option, write_figures

from data_prep.build import build
from data_prep.config import from_overrides
from data_prep.sample import write_sample_corpus


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    add_json_option(parser)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prep-bench-"))
    manifest = write_sample_corpus(root / "corpus")
    results = {}
    for workers in (1, 2):
        times, index = [], None
        for r in range(args.repeats):
            out = root / f"out-{workers}-{r}"
            started = time.perf_counter()
            index = build(str(manifest), str(out), from_overrides([f"workers={workers}"]), progress=False)
            times.append(time.perf_counter() - started)
            shutil.rmtree(out)
        t = statistics.median(times)
        seconds = index["totals"]["media_seconds"]
        audio = seconds.get("audio", 0.0) + seconds.get("video_audio", 0.0)
        results[workers] = {
            "median_s": round(t, 2),
            "samples_per_s": round(index["totals"]["samples"] / t, 1),
            "samples_per_s_per_worker": round(index["totals"]["samples"] / t / workers, 1),
            "audio_seconds_per_s_per_worker": round(audio / t / workers, 1),
            "video_seconds_per_s_per_worker": round(seconds.get("video", 0.0) / t / workers, 1),
        }
    shutil.rmtree(root)
    report = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
              "samples": index["totals"]["samples"], "by_workers": results,
              "speedup_2_vs_1": round(results[1]["median_s"] / results[2]["median_s"], 2)}
    print(json.dumps(report, indent=2))
    write_figures(args.json, "prep", report)


if __name__ == "__main__":
    main()
