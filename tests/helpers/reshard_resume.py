"""One rank of the resharding test (tests/test_reshard.py): set up a run resuming from a checkpoint through the
loop's own `setup`, on however many ranks torchrun (or a lone process) gives, and write what it restored: a digest
of every trainable parameter's full fp32 weights and AdamW moments (gathered with DeepSpeed's safe_get_full_*),
the optimizer's step counts, the learning rate, the step, the loader's re-dealt share; then one training step's
loss. Rank 0 writes OUT.json."""

from __future__ import annotations

import hashlib
import json
import sys

import torch


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from omni_train.config.compose import compose
    from omni_train.train.distributed import shutdown
    from omni_train.train.loop import _step, setup

    run = setup(compose(["logging.wandb_mode=disabled", "logging.progress_bar=false", *overrides]))
    engine = run.trainee.engine
    digests = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            digests[name] = [digest(safe_get_full_fp32_param(p)), digest(safe_get_full_optimizer_state(p, "exp_avg")),
                             digest(safe_get_full_optimizer_state(p, "exp_avg_sq"))]
    steps = sorted({int(v) for state in engine.optimizer.optimizer.state.values() for k, v in state.items()
                    if k == "step"})
    lr = run.trainee.scheduler.get_last_lr()[0]
    remainder = sum(len(u) for s in run.loader.states if s is not None for u in s.remainder.values())
    batches = iter(run.loader)
    _step(run, run.start_step + 1, [next(batches) for _ in range(run.cfg.trainer.grad_accum)])
    batches.close()
    if run.rank == 0:
        with open(out, "w") as f:
            json.dump({"digests": digests, "adam_steps": steps, "lr": lr, "start_step": run.start_step,
                       "world": run.world, "remainder_units": remainder, "loss": run.losses[run.start_step + 1]}, f)
    run.metrics.close()
    shutdown()


if __name__ == "__main__":
    main()
