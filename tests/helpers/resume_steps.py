"""One rank of the resume tests in tests/test_zero3_training.py, started by torchrun (or as a lone process): a run
resuming from a checkpoint through the loop's own `setup`, on however many ranks it is given, then steps.

Writes OUT.json (rank 0) with what the resume restored: a digest of every trainable parameter's full fp32 weights
and AdamW moments (gathered with DeepSpeed's safe_get_full_*), the optimizer's step counts, the learning rate, the
step, the size of the loader's re-dealt share; and the loss of one training step. With `--speech SHARDS` (2 ranks),
three more steps of the loop's train_step: a speech clip on each rank, rank 1's with NaN log-mel features in the
middle step (a NaN loss on one rank alone); for each, its loss, whether it was applied, whether this rank's weight
partitions and AdamW moments were bitwise unchanged, and the LR before it; then whether the weight check passes
finite weights and refuses (on both ranks) once one weight of rank 1's partition is infinite.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def snapshot(engine) -> list[torch.Tensor]:
    """This rank's trainable weight partitions and the optimizer's moments, copied."""
    weights = [p.ds_tensor.detach().clone() for p in engine.module.parameters() if p.requires_grad]
    moments = [v.detach().clone() for state in engine.optimizer.optimizer.state.values()
               for v in state.values() if torch.is_tensor(v)]
    return weights + moments


def nonfinite_steps(run, shards: str) -> dict:
    import webdataset as wds
    from pathlib import Path

    from omni_train.data.batch import collate_packed, decode_sample
    from omni_train.errors import Diverged
    from omni_train.tokens import PAD
    from omni_train.train.loop import check_finite_weights, train_step

    urls = [str(p) for p in sorted(Path(shards).glob("shard-*.tar"))]
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s).decode()]
    speech = [s for s in samples if s.audio and not s.vision]
    engine, steps = run.trainee.engine, []
    for step in range(3):
        batch = collate_packed([[speech[2 * step + run.rank]]], length=1024, pad_id=PAD)
        if step == 1 and run.rank == 1:
            batch["audio_features"] = torch.full_like(batch["audio_features"], float("nan"))
        lr, before = run.trainee.scheduler.get_last_lr()[0], snapshot(engine)
        done = train_step(engine, run.trainee.module, [batch], run.world)
        after = snapshot(engine)
        steps.append({"loss": done.loss, "applied": done.applied, "lr": lr,
                      "unchanged": all(torch.equal(x, y) for x, y in zip(before, after)),
                      "moments": sum(1 for s in engine.optimizer.optimizer.state.values() for v in s.values()
                                     if torch.is_tensor(v))})
    refused = [check_finite_weights(engine, 3, "checkpoint", None) is None]  # finite: passes
    if run.rank == 1:
        next(p for p in engine.module.parameters() if p.requires_grad).ds_tensor.view(-1)[0] = float("inf")
    try:
        check_finite_weights(engine, 3, "checkpoint", None)
        refused.append(False)
    except Diverged as e:
        refused.append("1 trainable weights are not finite" in str(e))
    return {"steps": steps, "refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--speech", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from omni_train.config.compose import compose
    from omni_train.train.distributed import shutdown
    from omni_train.train.loop import _step, setup

    run = setup(compose(["logging.wandb_mode=disabled", "logging.progress_bar=false", *args.overrides]))
    engine = run.trainee.engine
    digests = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            digests[name] = [digest(safe_get_full_fp32_param(p)), digest(safe_get_full_optimizer_state(p, "exp_avg")),
                             digest(safe_get_full_optimizer_state(p, "exp_avg_sq"))]
    adam_steps = sorted({int(v) for state in engine.optimizer.optimizer.state.values() for k, v in state.items()
                         if k == "step"})
    result = {"digests": digests, "adam_steps": adam_steps, "lr": run.trainee.scheduler.get_last_lr()[0],
              "start_step": run.start_step, "world": run.world,
              "remainder_units": sum(len(u) for s in run.loader.states if s is not None for u in s.remainder.values())}
    batches = iter(run.loader)
    _step(run, run.start_step + 1, [next(batches) for _ in range(run.cfg.trainer.grad_accum)])
    batches.close()
    result["loss"] = run.losses[run.start_step + 1]
    if args.speech:
        result.update(nonfinite_steps(run, args.speech))
    if run.rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    run.metrics.close()
    shutdown()


if __name__ == "__main__":
    main()
