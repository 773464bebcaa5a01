"""One process of the deepspeed=none test in tests/test_lora.py: the same LoRA run three times through the loop's own
`setup` and `_step`, in this order (the plain arms first: DeepSpeed's zero.Init, once run, may still partition
modules built later in the process):
- `plain`: deepspeed=none, 6 steps, a checkpoint after step 3;
- `resumed`: deepspeed=none, resumed from that checkpoint, steps 4-6;
- `zero3`: DeepSpeed's ZeRO-3 engine on this one process, 6 steps.
Writes OUT (JSON): per arm, the loss and gradient norm of each step.

    python -m tests.helpers.plain_steps OUT ROOT OVERRIDES...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS, SAVE = 6, 3


def arm(root: Path, name: str, overrides: list[str]) -> dict[int, list[float]]:
    from omni_train.config.compose import compose
    from omni_train.train.loop import _save, _step, setup

    run = setup(compose(["logging.wandb_mode=disabled", "logging.progress_bar=false", f"run_dir={root / name}",
                         f"trainer.max_steps={STEPS}", *overrides]))
    batches, out = iter(run.loader), {}
    run.trainee.engine.train()
    for step in range(run.start_step + 1, STEPS + 1):
        _step(run, step, [next(batches) for _ in range(run.cfg.trainer.grad_accum)])
        out[step] = [run.losses[step], float(run.trainee.engine.get_global_grad_norm())]
        if step == SAVE and name == "plain":
            _save(run, step)
    batches.close()
    run.metrics.close()
    return out


def main() -> None:
    out, root, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    from omni_train.train.distributed import shutdown

    results = {"plain": arm(root, "plain", [*overrides, "deepspeed=none"])}
    checkpoint = root / "plain" / "checkpoints" / f"step_{SAVE:08d}"
    results["resumed"] = arm(root, "resumed", [*overrides, "deepspeed=none", f"resume={checkpoint}"])
    results["zero3"] = arm(root, "zero3", [*overrides, "deepspeed=zero3"])
    out.write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
