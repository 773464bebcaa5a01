"""Peak memory per rank of a training step on a long packed row: sequence parallelism 2 against 1, activation
checkpointing on against off, and the fused tiled LM-head loss against the plain one (all labelled logits at once).

    .venv/bin/python benchmarks/step_memory.py [--len 16384] [--steps 3] [--shards DIR] [--only sp|loss]

One fixed row of --len tokens (the sample corpus's conversations, every kind, packed in order until the row is
full), trained for --steps steps by 2 processes under ZeRO-3 (tiny model, AdamW) in each configuration: with SP=1
both ranks train on the whole row, with SP=2 they share it, each holding half of its tokens. Parameters are
sharded over the same 2 ranks either way, so the difference is what one rank computes on: its tokens'
activations and its labelled positions' logits (the encoders run on the whole row's media in both). Reported per
configuration: the largest peak over ranks (max RSS on CPU, max CUDA allocation on GPU) and the step's own share
(peak minus the memory held before the first step). Goal (issue 5): SP=2 at most 0.6x of SP=1.

Loss section: rows of 4,096 and 32,768 tokens in which every assistant token is labelled (the corpus's own labels),
SP=1, checkpointing on, `trainer.logits_chunk` 1024 against 0. Goal (issue 8): tiled at most 1/3 of plain at 32k.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def fixed_row(shards: Path, length: int) -> dict:
    import webdataset as wds

    from omni_train.batch import collate_packed, decode_sample

    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode()]
    row, used = [], 0
    while True:
        s = samples[len(row) % len(samples)]
        if used + len(s) > length:
            break
        row.append(s)
        used += len(s)
    return collate_packed([row], length, pad_id=151643)


def worker(args) -> None:
    import torch

    from launch.cli import compose
    from omni_train.attention import SequenceParallel
    from omni_train.engine import init_distributed, shutdown
    from omni_train.objectives import label_tokens
    from omni_train.train import peak_memory_gb, thinker_engine

    cfg = compose(["trainer.micro_batch_size=1", f"trainer.sequence_parallel={args.sp}",
                   f"model.gradient_checkpointing={str(args.checkpointing).lower()}",
                   f"trainer.logits_chunk={args.logits_chunk}"])
    rank, world = init_distributed(timeout_min=5.0)
    engine, _, _ = thinker_engine(cfg, world, SequenceParallel(args.sp) if args.sp > 1 else None)
    batch = fixed_row(Path(args.shards), args.length)
    labels = label_tokens(batch["labels"])
    before = peak_memory_gb()
    for _ in range(args.steps):
        loss, _ = engine(**batch)
        engine.backward(loss / labels)
        engine.step()
    peaks = torch.tensor([peak_memory_gb(), peak_memory_gb() - before])
    torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"peak_gb": peaks[0].item(), "step_gb": peaks[1].item(),
                                              "labels": labels, "tokens": int(batch["input_ids"].numel())}))
    shutdown()


def measure(shards: Path, length: int, steps: int, sp: int, checkpointing: bool, root: Path,
            logits_chunk: int = 1024) -> dict:
    from common import run_workers

    return run_workers(__file__, ["--shards", str(shards), "--len", str(length), "--steps", str(steps), "--sp",
                                  str(sp), "--logits-chunk", str(logits_chunk),
                                  *(["--checkpointing"] if checkpointing else [])],
                       root / f"len{length}-sp{sp}-ckpt{int(checkpointing)}-chunk{logits_chunk}.json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--len", type=int, default=16384, dest="length")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--logits-chunk", type=int, default=1024)
    parser.add_argument("--only", choices=["sp", "loss"])
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from common import sample_shards

    root = Path(tempfile.mkdtemp(prefix="step-mem-"))
    shards = sample_shards(args.shards, root)
    if args.only != "loss":
        sequence_parallel(shards, args, root)
    if args.only != "sp":
        loss_tiling(shards, args, root)


def loss_tiling(shards: Path, args, root: Path) -> None:
    for length in (4096, 32768):
        runs = {chunk: measure(shards, length, args.steps, 1, True, root, logits_chunk=chunk) for chunk in (0, 1024)}
        for chunk, r in runs.items():
            print(f"row of {r['tokens']} tokens ({r['labels']} labelled), {'tiled (1024)' if chunk else 'plain'} "
                  f"loss: peak {r['peak_gb']:.2f} GB per rank, of which the step {r['step_gb']:.2f} GB", flush=True)
        print(f"tiled / plain at {length}: peak {runs[1024]['peak_gb'] / runs[0]['peak_gb']:.2f}x, step "
              f"{runs[1024]['step_gb'] / runs[0]['step_gb']:.2f}x", flush=True)


def sequence_parallel(shards: Path, args, root: Path) -> None:
    results = {}
    for checkpointing in (False, True):
        for sp in (1, 2):
            r = results[(sp, checkpointing)] = measure(shards, args.length, args.steps, sp, checkpointing, root)
            print(f"row of {r['tokens']} tokens ({r['labels']} labelled), SP={sp}, activation checkpointing "
                  f"{'on ' if checkpointing else 'off'}: peak {r['peak_gb']:.2f} GB per rank, of which the step "
                  f"{r['step_gb']:.2f} GB", flush=True)
    for key in ("peak_gb", "step_gb"):
        what = "peak" if key == "peak_gb" else "step"
        for checkpointing in (False, True):
            print(f"{what}: SP=2 / SP=1, checkpointing {'on ' if checkpointing else 'off'}: "
                  f"{results[(2, checkpointing)][key] / results[(1, checkpointing)][key]:.2f}x")
        for sp in (1, 2):
            print(f"{what}: checkpointing on / off, SP={sp}: {results[(sp, True)][key] / results[(sp, False)][key]:.2f}x")


if __name__ == "__main__":
    main()
