"""One rank of the sequence-parallel equivalence test (started by torchrun from tests/test_sequence_parallel.py).

Runs one ZeRO-3 forward + backward of the Thinker on a fixed packed batch (2 rows; by default every kind of
sample: speech, image, video with its audio, video, image + speech, text) with `--sp` ranks sharing each row, the loss scaled as
the training loop scales it. Rank 0 writes OUT: the loss per label token, the per-condition stats and every full
gradient (gathered from the ZeRO-3 partitions). `--override` passes config overrides (checkpointing, MLP tiling). `--control` replaces the per-sample attention core with plain
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
    from omni_train.batch import collate_packed, decode_sample

    picked = {}
    urls = [str(p) for p in sorted(Path(shards).glob("shard-*.tar"))]
    for raw in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode():
        kind = next((k for k in kinds if raw["json"]["id"].startswith(k)), None)
        if kind and kind not in picked:
            picked[kind] = decode_sample(raw)
    samples = [picked[k] for k in kinds]
    packed = [samples[r::rows] for r in range(rows)]
    length = -(-max(sum(len(s) for s in row) for row in packed) // 64) * 64 + 64  # a padding "sample" too
    return collate_packed(packed, length, pad_id=151643)


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

    from launch.cli import compose
    from omni_train import activations
    from omni_train.attention import SequenceParallel, use_packed_attention
    from omni_train.engine import (
        deepspeed_config,
        init_distributed,
        initialize,
        shutdown,
    )
    from omni_train.model import build_thinker
    from omni_train.objectives import ThinkerLM, label_tokens

    cfg = compose([f"model.path={args.model}", "trainer.micro_batch_size=2", f"trainer.sequence_parallel={args.sp}",
                   *args.override])
    rank, world = init_distributed(timeout_min=2.0)
    sp = SequenceParallel(args.sp) if args.sp > 1 else None
    ds_config = deepspeed_config(cfg, world)
    thinker = build_thinker(cfg.model, ds_config)
    activations.apply(thinker, cfg.trainer)
    if sp is not None:
        sp.attach(thinker.model.language_model, 2, causal_over_row if args.control else "sdpa")
    else:
        use_packed_attention(thinker.model.language_model)
    module = ThinkerLM(thinker, sp, cfg.trainer.logits_chunk)
    engine, _, _ = initialize(cfg, module, ds_config)
    engine.train()

    batch = fixed_batch(args.shards, tuple(args.kinds.split(",")), args.rows)
    labels = label_tokens(batch["labels"])  # the whole row's labels, counted once (as the loop does)
    loss, stats = engine(**batch)
    engine.backward(loss * world / labels)
    total = loss.detach().double().reshape(1)
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(stats)
    grads = {}
    for name, p in engine.module.named_parameters():
        grad = deepspeed.utils.safe_get_full_grad(p)  # collective: every rank gathers every gradient
        if rank == 0:
            grads[name] = grad.detach().clone()
    if rank == 0:
        torch.save({"loss": total / labels, "stats": stats, "grads": grads, "length": batch["input_ids"].shape[1]},
                   args.out)
    shutdown()


if __name__ == "__main__":
    main()
