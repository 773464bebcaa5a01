"""Peak memory per rank of a training step on a long packed row: sequence parallelism 2 against 1, activation
checkpointing on against off, and the fused tiled LM-head loss against the plain one (all labelled logits at once).

    .venv/bin/python benchmarks/step_memory.py [--len 16384] [--steps 3] [--shards DIR] [--only sp|loss|activations]
                                               [--json FILE]

One fixed row of --len tokens (the sample corpus's conversations, every kind, packed in order until the row is
full), trained for --steps steps by 2 processes under ZeRO-3 (tiny model, AdamW) in each configuration: with SP=1
both ranks train on the whole row, with SP=2 they share it, each holding half of its tokens. Parameters are
sharded over the same 2 ranks either way, so the difference is what one rank computes on: its tokens'
activations and its labelled positions' logits (the encoders run on the whole row's media in both). Reported per
configuration: the largest peak over ranks (max RSS on CPU, max CUDA allocation on GPU) and the step's own share
(peak minus the memory held before the first long-row step, after a warm-up step on a 1,024-token row that
allocated the optimizer state). Goal (issue 5): SP=2 at most 0.6x of SP=1.

Loss section: rows of 4,096 and 32,768 tokens in which every assistant token is labelled (the corpus's own labels),
SP=1, checkpointing full, `trainer.logits_chunk` 1024 against 0; on the tiny preset (2 processes) and on the small
preset (realistic vocabulary/hidden ratio; 1 process, 1 step). Goal (issue 8): tiled at most 1/3 of plain at 32k.

Activations section: the small preset with 8 decoder layers (loss tiles of 256) on one --activations-len row (8,192), 1 process, 1 step, for each checkpointing mode (none,
selective every 2nd layer, full, full offloaded) and the tiled MLP (4,096 tokens a tile) with and without full
checkpointing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def fixed_row(shards: Path, length: int) -> dict:
    import webdataset as wds

    from omni_train.data.batch import collate_packed, decode_sample
    from omni_train.tokens import PAD

    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode()]
    row, used = [], 0
    while True:
        s = samples[len(row) % len(samples)]
        if used + len(s) > length:
            break
        row.append(s)
        used += len(s)
    return collate_packed([row], length, pad_id=PAD)


def worker(args) -> None:
    import torch

    from omni_train.config.compose import compose
    from omni_train.model.kernels.attention import SequenceParallel
    from omni_train.model.thinker import label_tokens
    from omni_train.train.distributed import init_distributed, shutdown
    from omni_train.train.loop import train_step
    from omni_train.train.metrics import peak_memory_gb
    from omni_train.train.recipes import recipe

    cfg = compose(["trainer.micro_batch_size=1", *args.override])
    rank, world = init_distributed(timeout_min=30.0)
    degree = cfg.trainer.sequence_parallel
    sp = SequenceParallel(degree) if degree > 1 else None
    trainee = recipe(cfg.stage.objective).build(cfg, world, sp)
    trainee.engine.train()

    def step(batch: dict) -> None:
        train_step(trainee.engine, trainee.module, [batch], world, counts_data=sp is None or sp.rank == 0)

    # A warm-up step on a short row first: the optimizer state (allocated by the first step) and the allocator's
    # pools are then part of `before`, and "step" is what the long row's step adds.
    step(fixed_row(Path(args.shards), 1024))
    batch = fixed_row(Path(args.shards), args.length)
    labels = label_tokens(batch["labels"])
    before = peak_memory_gb()
    for _ in range(args.steps):
        step(batch)
    peaks = torch.tensor([peak_memory_gb(), peak_memory_gb() - before])
    torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"peak_gb": peaks[0].item(), "step_gb": peaks[1].item(),
                                              "labels": labels, "tokens": int(batch["input_ids"].numel())}))
    shutdown()


def measure(shards: Path, length: int, steps: int, root: Path, overrides: list[str], processes: int = 2) -> dict:
    from common import run_workers

    name = "-".join(o.split(".")[-1].replace("=", "") for o in overrides) or "default"
    return run_workers(__file__, ["--shards", str(shards), "--len", str(length), "--steps", str(steps),
                                  *(f"--override={o}" for o in overrides)],
                       root / f"len{length}-{name}.json", processes)


def main() -> None:
    from common import add_json_option, write_figures

    parser = argparse.ArgumentParser()
    parser.add_argument("--len", type=int, default=16384, dest="length")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--activations-len", type=int, default=8192)
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out")
    parser.add_argument("--only", choices=["sp", "loss", "activations"])
    add_json_option(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from common import sample_shards

    root = Path(tempfile.mkdtemp(prefix="step-mem-"))
    shards = sample_shards(args.shards, root)
    figures = {}
    if args.only in (None, "sp"):
        figures.update(sequence_parallel(shards, args, root))
    if args.only in (None, "loss"):
        figures.update(loss_tiling(shards, args, root))
    if args.only in (None, "activations"):
        figures.update(activation_modes(shards, args, root))
    print(json.dumps(figures, indent=2))
    write_figures(args.json, "step_memory", figures)


def _line(r: dict, what: str) -> str:
    return (f"row of {r['tokens']} tokens ({r['labels']} labelled), {what}: peak {r['peak_gb']:.2f} GB per rank, of "
            f"which the step {r['step_gb']:.2f} GB")


# The small preset does not fit twice in this machine's memory with the plain loss at 32k: one process, which
# holds the whole model (ZeRO-3 over a world of 1), so its figures compare tiled and plain only with each other.
PRESETS = {"tiny": 2, "small": 1}


def loss_tiling(shards: Path, args, root: Path) -> dict:
    figures = {}
    for preset, processes in PRESETS.items():
        steps = args.steps if preset == "tiny" else 1
        for length in (4096, 32768):
            runs = {chunk: measure(shards, length, steps, root, [f"model={preset}", "trainer.checkpointing=full",
                                                                  f"trainer.logits_chunk={chunk}"], processes)
                    for chunk in (0, 1024)}
            for chunk, r in runs.items():
                print(_line(r, f"{preset}, {processes} process(es), {'tiled (1024)' if chunk else 'plain'} loss"),
                      flush=True)
            for key in ("peak_gb", "step_gb"):
                ratio = runs[1024][key] / runs[0][key]
                figures[f"loss_tiled_vs_plain.{preset}.{length}.{key[:-3]}_ratio"] = round(ratio, 3)
                figures[f"loss_plain.{preset}.{length}.{key}"] = round(runs[0][key], 3)
                figures[f"loss_tiled.{preset}.{length}.{key}"] = round(runs[1024][key], 3)
            print(f"{preset}: tiled / plain at {length}: peak {runs[1024]['peak_gb'] / runs[0]['peak_gb']:.2f}x, "
                  f"step {runs[1024]['step_gb'] / runs[0]['step_gb']:.2f}x", flush=True)
    return figures


# The small preset with 8 decoder layers (activations grow with depth, the loss tile does not) and 256 labelled
# tokens per loss tile, so that what a mode keeps per layer is what the figures show.
ACTIVATION_MODEL = ["model=small", "model.hf_config.thinker_config.text_config.num_hidden_layers=8",
                    "trainer.logits_chunk=256"]
ACTIVATION_MODES = {
    "none": ["trainer.checkpointing=none"],
    "selective": ["trainer.checkpointing=selective", "trainer.checkpoint_every=2"],
    "full": ["trainer.checkpointing=full"],
    "full_offload": ["trainer.checkpointing=full", "trainer.offload_activations=true"],
    "full_tiled_mlp": ["trainer.checkpointing=full", "trainer.mlp_chunk=4096"],
    "none_tiled_mlp": ["trainer.checkpointing=none", "trainer.mlp_chunk=4096"],
}


def activation_modes(shards: Path, args, root: Path) -> dict:
    """The small preset (realistic widths) on one --activations-len row, 1 process: what each checkpointing mode and the tiled
    MLP keep. On CPU, offloading moves nothing (the activations are in host memory already): it must not cost."""
    figures, runs = {}, {}
    for name, overrides in ACTIVATION_MODES.items():
        r = runs[name] = measure(shards, args.activations_len, 1, root, [*ACTIVATION_MODEL, *overrides], processes=1)
        print(_line(r, f"small, {name}"), flush=True)
        figures[f"activations.{name}.step_gb"] = round(r["step_gb"], 3)
    for name in ACTIVATION_MODES:
        if name != "none":
            ratio = runs[name]["step_gb"] / runs["none"]["step_gb"]
            figures[f"activations.{name}_vs_none.step_ratio"] = round(ratio, 3)
            print(f"step memory {name} / none: {ratio:.2f}x", flush=True)
    return figures


def sequence_parallel(shards: Path, args, root: Path) -> dict:
    results, figures = {}, {}
    for checkpointing in ("none", "full"):
        for sp in (1, 2):
            r = results[(sp, checkpointing)] = measure(
                shards, args.length, args.steps, root,
                [f"trainer.sequence_parallel={sp}", f"trainer.checkpointing={checkpointing}"])
            print(_line(r, f"SP={sp}, checkpointing {checkpointing}"), flush=True)
    for key in ("peak_gb", "step_gb"):
        what = key[:-3]
        for checkpointing in ("none", "full"):
            ratio = results[(2, checkpointing)][key] / results[(1, checkpointing)][key]
            figures[f"sp2_vs_sp1.checkpointing_{checkpointing}.{what}_ratio"] = round(ratio, 3)
            print(f"{what}: SP=2 / SP=1, checkpointing {checkpointing}: {ratio:.2f}x")
    return figures


if __name__ == "__main__":
    main()
