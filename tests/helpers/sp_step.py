"""One rank of the sequence-parallel equivalence test (started by torchrun from tests/test_sequence_parallel.py).

Runs the training loop's own step (omni_train.train.loop.train_step, on the module the Thinker recipe builds) on a
fixed packed batch (2 rows; by default every kind of sample: speech, image, video with its audio, video, image +
speech, text) with `--sp` ranks sharing each row, without the optimizer update. Rank 0 writes OUT: the loss per
label token, the per-condition metrics and every full gradient (gathered from the ZeRO-3 partitions). `--override` passes config overrides (checkpointing, MLP tiling). `--control` replaces the per-sample attention core with plain
causal SDPA over the gathered row (what DeepSpeed's own transformers wrapper runs), which must change the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds

KINDS = ("speech-", "image-", "video-000", "video-001", "mixed-", "text-0001", "text-0002", "text-0003")


def causal_over_row(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **_):
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def fixed_batch(shards: str, kinds: tuple[str, ...] = KINDS, rows: int = 2) -> dict[str, torch.Tensor]:
    from omni_train.data.batch import collate_packed, decode_sample
    from omni_train.tokens import PAD

    picked = {}
    urls = [str(p) for p in sorted(Path(shards).glob("shard-*.tar"))]
    for raw in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode():
        kind = next((k for k in kinds if raw["json"]["id"].startswith(k)), None)
        if kind and kind not in picked:
            picked[kind] = decode_sample(raw)
    samples = [picked[k] for k in kinds]
    packed = [samples[r::rows] for r in range(rows)]
    length = -(-max(sum(len(s) for s in row) for row in packed) // 64) * 64 + 64  # a padding "sample" too
    return collate_packed(packed, length, pad_id=PAD)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--control", action="store_true")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated sample id prefixes")
    parser.add_argument("--rows", type=int, default=2, help="rows in the batch (micro_batch_size stays 2)")
    parser.add_argument("--override", action="append", default=[], help="a config override (repeatable)")
    args = parser.parse_args()

    import deepspeed

    from omni_train.config.compose import compose
    from omni_train.model.kernels.attention import SequenceParallel
    from omni_train.train.distributed import init_distributed, shutdown
    from omni_train.train.loop import train_step
    from omni_train.train.recipes import recipe

    cfg = compose([f"model.path={args.model}", "trainer.micro_batch_size=2", f"trainer.sequence_parallel={args.sp}",
                   *args.override])
    rank, world = init_distributed(timeout_min=2.0)
    sp = SequenceParallel(args.sp) if args.sp > 1 else None
    trainee = recipe(cfg.stage.objective).build(cfg, world, sp)  # what the training loop builds
    if args.control:
        sp.attach(trainee.module.thinker.model.language_model, 2, causal_over_row)
    engine = trainee.engine
    engine.train()

    batch = fixed_batch(args.shards, tuple(args.kinds.split(",")), args.rows)
    # the loop's own step, gradients kept for reading instead of an optimizer step
    step = train_step(engine, trainee.module, [batch], world, counts_data=sp is None or sp.rank == 0, update=False)
    grads = {}
    for name, p in engine.module.named_parameters():
        grad = deepspeed.utils.safe_get_full_grad(p)  # collective: every rank gathers every gradient
        if rank == 0:
            grads[name] = grad.detach().clone()
    if rank == 0:
        torch.save({"loss": step.loss, "metrics": step.metrics, "grads": grads, "length": batch["input_ids"].shape[1]},
                   args.out)
    shutdown()


if __name__ == "__main__":
    main()
