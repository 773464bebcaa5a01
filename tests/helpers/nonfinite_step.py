"""One rank of the skipped-step test (started by torchrun from tests/test_divergence.py).

Three steps of the loop's own train_step on what the Thinker recipe builds, under ZeRO-3: a normal step, then a step
whose speech clip on rank 1 only has NaN log-mel features (a corrupt feature tensor: the loss is NaN on that rank
alone), then a normal step. Writes OUT/rank{R}.json: each step's loss and whether it was applied, and whether this
rank's weight partitions, AdamW moments and learning rate were bitwise unchanged by the skipped step and changed
by the next one; then whether a weight check passes finite weights and refuses (on both ranks) after one weight of
rank 1's partition is set to infinity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import webdataset as wds


def snapshot(engine) -> list[torch.Tensor]:
    """This rank's trainable weight partitions and the optimizer's moments, copied."""
    weights = [p.ds_tensor.detach().clone() for p in engine.module.parameters() if p.requires_grad]
    moments = [v.detach().clone() for state in engine.optimizer.optimizer.state.values()
               for v in state.values() if torch.is_tensor(v)]
    return weights + moments


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from omni_train.config.compose import compose
    from omni_train.data.batch import collate_packed, decode_sample
    from omni_train.tokens import PAD
    from omni_train.train.distributed import init_distributed, shutdown
    from omni_train.errors import Diverged
    from omni_train.train.loop import check_finite_weights, train_step
    from omni_train.train.recipes import recipe

    cfg = compose(["model=tiny", "trainer.micro_batch_size=1", "trainer.warmup_steps=0", "trainer.lr=1e-3",
                   "trainer.max_steps=3"])
    rank, world = init_distributed(timeout_min=2.0)
    torch.manual_seed(0)
    urls = [str(p) for p in sorted(Path(args.shards).glob("shard-*.tar"))]
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode()]
    speech = [s for s in samples if s.audio and not s.vision]
    trainee = recipe(cfg.stage.objective).build(cfg, world)
    engine = trainee.engine
    steps, before = [], None
    for step in range(3):
        batch = collate_packed([[speech[2 * step + rank]]], length=1024, pad_id=PAD)
        if step == 1 and rank == 1:
            batch["audio_features"] = torch.full_like(batch["audio_features"], float("nan"))
        lr = trainee.scheduler.get_last_lr()[0]
        state = snapshot(engine)
        done = train_step(engine, trainee.module, [batch], world)
        after = snapshot(engine)
        steps.append({"loss": done.loss, "applied": done.applied, "unchanged": same(state, after), "lr": lr,
                      "moments": sum(1 for s in engine.optimizer.optimizer.state.values() for v in s.values()
                                     if torch.is_tensor(v))})
        before = after
    del before
    refused = [check_finite_weights(engine, 3, "checkpoint", None) is None]  # finite: passes
    if rank == 1:  # one weight of rank 1's partition overflows: both ranks refuse to save
        next(p for p in engine.module.parameters() if p.requires_grad).ds_tensor.view(-1)[0] = float("inf")
    try:
        check_finite_weights(engine, 3, "checkpoint", None)
        refused.append(False)
    except Diverged as e:
        refused.append("1 trainable weights are not finite" in str(e))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({"steps": steps, "refused": refused}))
    shutdown()


if __name__ == "__main__":
    main()
