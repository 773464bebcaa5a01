"""Training tokens/s: packed rows against the same samples in padded per-batch form (what public trainers run).

    .venv/bin/python benchmarks/step_throughput.py [--len 2048] [--batch 8] [--shards DIR] [--repeat 3]

Both arms are 2-process ZeRO-3 training (tiny model, AdamW, forward + backward + step) over the same samples of the
sample corpus, in the same order, each rank taking every other micro-batch:
- packed: best-fit rows of --len tokens (omni_train.data.batch), 2 rows per micro-batch, attention per sample;
- padded: micro-batches of --batch samples, each padded to the batch's longest (rounded up to 64), one sample per
  row: the padding is computed on, as a padded trainer does.
Reported: real (non-padding) tokens per second over all ranks, median of --repeat passes after one warm-up pass,
and the ratio. Goal (issue 8): packed at least 2x padded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def micro_batches(shards: Path, mode: str, length: int, batch: int) -> list[tuple[dict, int]]:
    """(collated micro-batch, its real tokens) in order."""
    import webdataset as wds

    from omni_train.data.batch import best_fit, collate_packed, decode_sample
    from omni_train.tokens import PAD

    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode()]
    samples = [s for s in samples if len(s) <= length]
    if mode == "packed":
        rows = [[samples[i] for i in b] for b in best_fit([len(s) for s in samples], length)]
        return [(collate_packed(rows[i:i + 2], length, pad_id=PAD), sum(len(s) for r in rows[i:i + 2] for s in r))
                for i in range(0, len(rows), 2)]
    out = []
    for i in range(0, len(samples), batch):
        group = samples[i:i + batch]
        longest = -(-max(len(s) for s in group) // 64) * 64
        out.append((collate_packed([[s] for s in group], longest, pad_id=PAD), sum(len(s) for s in group)))
    return out


def worker(args) -> None:
    import torch

    from omni_train.config.compose import compose
    from omni_train.train.distributed import init_distributed, shutdown
    from omni_train.train.loop import train_step
    from omni_train.train.recipes import recipe

    cfg = compose([f"trainer.micro_batch_size={args.batch}"])
    rank, world = init_distributed(timeout_min=5.0)
    trainee = recipe(cfg.stage.objective).build(cfg, world)
    batches = micro_batches(Path(args.shards), args.mode, args.length, args.batch)
    batches = batches[: len(batches) // world * world][rank::world]  # the same number of steps on every rank

    def one_pass() -> float:
        torch.distributed.barrier()
        started = time.perf_counter()
        for b, _ in batches:
            train_step(trainee.engine, trainee.module, [b], world)
        torch.distributed.barrier()
        return time.perf_counter() - started

    one_pass()  # warm-up
    times = [one_pass() for _ in range(args.repeat)]
    tokens = torch.tensor([float(sum(n for _, n in batches))])
    torch.distributed.all_reduce(tokens)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"tokens": tokens.item(), "seconds": times,
                                              "micro_batches": len(batches) * world}))
    shutdown()


def measure(shards: Path, mode: str, args, root: Path) -> dict:
    from common import run_workers

    return run_workers(__file__, ["--mode", mode, "--shards", str(shards), "--len", str(args.length), "--batch",
                                  str(args.batch), "--repeat", str(args.repeat)], root / f"{mode}.json")


def main() -> None:
    from common import add_json_option

    parser = argparse.ArgumentParser()
    parser.add_argument("--len", type=int, default=2048, dest="length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode", choices=["packed", "padded"])
    parser.add_argument("--out")
    add_json_option(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from common import sample_shards, write_figures

    root = Path(tempfile.mkdtemp(prefix="step-tput-"))
    shards = sample_shards(args.shards, root)
    rates = {}
    for mode in ("packed", "padded"):
        r = measure(shards, mode, args, root)
        rates[mode] = r["tokens"] / statistics.median(r["seconds"])
        print(f"{mode}: {r['micro_batches']} micro-batches, {r['tokens']:.0f} real tokens, median pass "
              f"{statistics.median(r['seconds']):.2f} s: {rates[mode]:,.0f} tokens/s", flush=True)
    print(f"packed / padded: {rates['packed'] / rates['padded']:.2f}x")
    write_figures(args.json, "step_throughput", {"packed_tokens_per_s": round(rates["packed"], 1),
                                                 "padded_tokens_per_s": round(rates["padded"], 1),
                                                 "packed_vs_padded_ratio": round(rates["packed"] / rates["padded"], 3)})


if __name__ == "__main__":
    main()
