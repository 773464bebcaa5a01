"""Run every CPU benchmark of the project and write `benchmarks/results.json`: a flat map from figure name to number
(the machine too: `machine.cores`, `machine.memory_gb`, `machine.gpus`).

    .venv/bin/python benchmarks/run_all.py [--quick] [--out benchmarks/results.json]

Runs prep_throughput, loader_throughput, packing_efficiency, step_throughput, step_memory, lora_vs_full,
attention_core, encoder_attention and prep_scale (each also runs alone) one after the other on the same machine, on one sample corpus
(lora_vs_full and prep_scale build their own text data), and merges their figures, each under its benchmark's
prefix. The ratios the issues set goals for are repeated under `ratio.*`:
- `ratio.loss_tiled_vs_plain.peak.32k` (tiny and small presets; goal <= 1/3),
- `ratio.packed_vs_padded.tokens_per_s` (goal >= 2),
- `ratio.encoding_vs_processor_path.per_core` (ours against transformers' Qwen2.5-Omni processor path, audio
  padded to 300 s; goal >= 10),
- `ratio.sp2_vs_sp1.step_memory` (goal <= 0.6),
- `ratio.attention_core_vs_per_sample_loop.100_samples.tiny` / `.small` (an 8k row of 100 samples, forward and
  backward; goal <= 1),
- `ratio.encoder_attention_vs_sdpa.tiny.audio` / `.video` (the encoders' one call per layer against transformers'
  per-chunk `sdpa` loop, forward and backward; goal <= 1 within noise: the same kernels on CPU).
`--quick` shortens the timed windows and repeats (for a smoke run, not for figures to quote). The whole run takes
about half an hour on a 2-core machine. Nothing else should run meanwhile: the figures are throughput and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, sample_corpus

RATIOS = {
    "ratio.loss_tiled_vs_plain.peak.32k.tiny": "step_memory.loss_tiled_vs_plain.tiny.32768.peak_ratio",
    "ratio.loss_tiled_vs_plain.peak.32k.small": "step_memory.loss_tiled_vs_plain.small.32768.peak_ratio",
    "ratio.loss_tiled_vs_plain.step.32k.tiny": "step_memory.loss_tiled_vs_plain.tiny.32768.step_ratio",
    "ratio.loss_tiled_vs_plain.step.32k.small": "step_memory.loss_tiled_vs_plain.small.32768.step_ratio",
    "ratio.packed_vs_padded.tokens_per_s": "step_throughput.packed_vs_padded_ratio",
    "ratio.encoding_vs_processor_path.per_core": "loader.ratio_per_core_vs_processor_path_300s",
    "ratio.sp2_vs_sp1.step_memory": "step_memory.sp2_vs_sp1.checkpointing_none.step_ratio",
    "ratio.attention_core_vs_per_sample_loop.100_samples.tiny": "attention_core.tiny.100_samples.ratio",
    "ratio.attention_core_vs_per_sample_loop.100_samples.small": "attention_core.small.100_samples.ratio",
    "ratio.encoder_attention_vs_sdpa.tiny.audio": "encoder_attention.tiny.audio.ratio",
    "ratio.encoder_attention_vs_sdpa.tiny.video": "encoder_attention.tiny.video.ratio",
}


def _write(path: Path, figures: dict, started: float) -> None:
    out = {**figures, "started_unix": int(started)}
    for ratio, source in RATIOS.items():
        if source in figures:
            out[ratio] = figures[source]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(out.items())), indent=2) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results.json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-all-"))
    _, shards = sample_corpus(root)
    quick = args.quick
    runs = {
        "prep_throughput": ["--repeats", "1" if quick else "3"],
        "loader_throughput": ["--seconds", "4" if quick else "15"],
        "packing_efficiency": ["--shards", str(shards), "--window", "2048"],
        "step_throughput": ["--shards", str(shards), "--repeat", "1" if quick else "3"],
        "step_memory": ["--shards", str(shards), "--steps", "1" if quick else "3"],
        "lora_vs_full": ["--steps", "4" if quick else "12"],
        "prep_scale": ["--lines", "2000", "20000", "--parts-lines", "5000"] if quick else [],
        "attention_core": ["--repeats", "1" if quick else "7"],
        "encoder_attention": ["--repeats", "1" if quick else "5", "--seconds", "1,3"],
    }
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    figures = {"machine.cores": os.cpu_count(), "machine.memory_gb": round(memory_gb, 1), "machine.gpus": 0,
               "quick": int(quick)}
    started = time.time()
    for name, extra in runs.items():
        out = root / f"{name}.json"
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *extra, "--json", str(out)],
                              cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if done.returncode != 0:
            sys.exit(f"run_all: {name} failed (exit {done.returncode}); {args.out} holds the benchmarks before it")
        figures.update(json.loads(out.read_text()))
        figures[f"seconds.{name}"] = round(time.perf_counter() - t0, 1)
        _write(args.out, figures, started)  # after each benchmark: a later failure keeps what was measured
    print(json.dumps({k: v for k, v in json.loads(args.out.read_text()).items() if k.startswith("ratio.")}, indent=2))
    print(f"run_all: {len(figures)} figures ({platform.machine()}, {os.cpu_count()} cores) -> {args.out}")


if __name__ == "__main__":
    main()
