"""Peak memory per rank of a long packed row: sequence parallelism 2 against 1, activation checkpointing on and off.

    .venv/bin/python benchmarks/sp_memory.py [--len 8192] [--steps 3] [--shards DIR]

Every configuration is a real 2-process ZeRO-3 training run (`omni-launch`, tiny model, the sample corpus packed
into rows of --len tokens, one row per micro-batch): with SP=1 each rank trains on its own row, with SP=2 the two
ranks share one row, each holding half of its tokens. Both shard the parameters over the same 2 ranks, so the
difference is the activations (and the labelled positions' logits) of half a row. Reported: the largest peak
memory over ranks and steps (`peak_mem_gb` in metrics.jsonl: max RSS on CPU, max CUDA allocation on GPU) and the
ratios. Goal (issue 5): SP=2 at most 0.6x of SP=1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import sample_shards

REPO = Path(__file__).resolve().parents[1]


def peak(shards: Path, length: int, steps: int, sp: int, checkpointing: bool, root: Path) -> float:
    run_dir = root / f"sp{sp}-ckpt{int(checkpointing)}"
    cmd = [sys.executable, "-m", "launch.cli", "logging.wandb_mode=disabled", "logging.progress_bar=false",
           f"run_dir={run_dir}", f"data.sources=[{{name:s,path:{shards}}}]", f"data.max_len={length}",
           f"data.chunk_samples={300}", "data.workers=0", "trainer.micro_batch_size=1", f"trainer.max_steps={steps}",
           "trainer.warmup_steps=0", "trainer.export=false", f"trainer.save_every={10 * steps}",
           f"trainer.sequence_parallel={sp}", f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    done = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"sp_memory: run failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_mem_gb"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--len", type=int, default=8192, dest="length")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shards", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sp-mem-"))
    shards = sample_shards(args.shards, root)
    results = {}
    for checkpointing in (False, True):
        for sp in (1, 2):
            results[(sp, checkpointing)] = peak(shards, args.length, args.steps, sp, checkpointing, root)
            print(f"rows of {args.length}, SP={sp}, activation checkpointing {'on ' if checkpointing else 'off'}: "
                  f"peak {results[(sp, checkpointing)]:.2f} GB per rank", flush=True)
    for checkpointing in (False, True):
        print(f"SP=2 / SP=1, checkpointing {'on ' if checkpointing else 'off'}: "
              f"{results[(2, checkpointing)] / results[(1, checkpointing)]:.2f}x")
    for sp in (1, 2):
        print(f"checkpointing on / off, SP={sp}: {results[(sp, True)] / results[(sp, False)]:.2f}x")


if __name__ == "__main__":
    main()
