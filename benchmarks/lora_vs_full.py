"""LoRA against full fine-tuning: trained parameters, checkpoint size, peak memory and tokens/s.

    .venv/bin/python benchmarks/lora_vs_full.py [--model small] [--steps 12] [--len 1024] [--json FILE]

Three arms of the same SFT run (`omni-launch`, one process, the same text shards of the sample corpus in the same
order, the same seed, `model=small` by default: Qwen2.5-0.5B's width, the real vocabulary, random init, fp32):
- full: every parameter trains under DeepSpeed ZeRO-3 (the baseline);
- lora: `stage.lora.enabled=true` (r=16 on the language model's attention and MLP projections) under ZeRO-3;
- lora_plain: the same LoRA without DeepSpeed (`deepspeed=none`, the single-GPU path).
Reported per arm: trained parameters (summary.json), the size of its last checkpoint directory, the peak resident
memory of the training process (ru_maxrss of the largest child; on CPU the weights, gradients and AdamW state all
live there), and the median tokens/s of the steps after the first two; then each LoRA arm's ratios to full.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, add_json_option, write_figures

ARMS = {
    "full": [],
    "lora": ["stage.lora.enabled=true"],
    "lora_plain": ["stage.lora.enabled=true", "deepspeed=none"],
}


def text_shards(root: Path) -> Path:
    from data_prep.build import build
    from data_prep.config import from_overrides
    from data_prep.sample import write_text_corpus

    out = root / "shards"
    build(str(write_text_corpus(root / "text")), str(out), from_overrides(["workers=1"]), progress=False)
    return out


def arm(name: str, shards: Path, root: Path, args) -> dict:
    """One arm in a fresh process tree (so ru_maxrss of the children is this arm's alone)."""
    run_dir = root / name
    cmd = [sys.executable, "-m", "launch.cli", "logging.wandb_mode=disabled", "logging.progress_bar=false",
           "stage=sft", f"model={args.model}", f"run_dir={run_dir}", f"data.sources=[{{name:text,path:{shards}}}]",
           f"data.max_len={args.length}", "data.chunk_samples=64", "data.workers=0", "trainer.micro_batch_size=1",
           f"trainer.max_steps={args.steps}", f"trainer.save_every={args.steps}", "trainer.warmup_steps=0",
           "launcher.nproc_per_node=1", *ARMS[name]]
    probe = [sys.executable, "-c", "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)", *cmd]
    done = subprocess.run(probe, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1)),
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lora_vs_full: arm {name} failed:\n{done.stderr[-3000:]}")
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 2]
    checkpoint = Path(summary["checkpoint"])
    return {"trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "checkpoint_mb": sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) / 2**20,
            "peak_rss_gb": peak_kb / 2**20, "tokens_per_s": statistics.median(rates),
            "last_loss": summary["last_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--len", type=int, default=1024, dest="length")
    add_json_option(parser)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lora-vs-full-"))
    shards = text_shards(root)
    results = {name: arm(name, shards, root, args) for name in ARMS}
    print(f"{'arm':<11} {'trained params':>15} {'checkpoint MB':>14} {'peak RSS GB':>12} {'tokens/s':>9}")
    for name, r in results.items():
        print(f"{name:<11} {r['trainable_params']:>15,} {r['checkpoint_mb']:>14.1f} {r['peak_rss_gb']:>12.2f} "
              f"{r['tokens_per_s']:>9.0f}")
    full = results["full"]
    for name in ("lora", "lora_plain"):
        r = results[name]
        r["vs_full"] = {key: round(r[key] / full[key], 4)
                        for key in ("trainable_params", "checkpoint_mb", "peak_rss_gb", "tokens_per_s")}
        print(f"{name} / full: " + ", ".join(f"{k} {v:.3g}x" for k, v in r["vs_full"].items()))
    write_figures(args.json, "lora_vs_full", results)


if __name__ == "__main__":
    main()
