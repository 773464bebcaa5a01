"""Evaluation: held-out loss of the objective being trained, inside the loop and on a saved model.

Owns `evaluate(engine, module, sets, ...)`: every held-out source (omni_train/data/heldout.py) through the engine
without gradient and without dropout, every rank running the same number of micro-batches (short shares padded
with weight-0 fillers, so ZeRO-3's gathers match), the sums reduced across ranks once per source. It returns
flat metrics: `eval/loss` over all sources (per unit: label tokens, codec targets or triplets, as the objective
counts them), and per source `eval/<source>/loss`, its units, the objective's own step metrics (per-condition
losses and label counts for the Thinker; codec loss, DPO reward accuracy and margin for the Talker) and the
samples set aside by reason.

`run(cfg)` evaluates a saved model (`model.path`): the objective of `stage` built from it under ZeRO-3 exactly as
training builds it (`omni-train eval`, omni_train/tools/evaluate.py). One process by default; under torchrun every
rank takes its share.
"""

from __future__ import annotations

import torch

from omni_train.data.batch import to_device


def heldout_sets(cfg, tokenizer, dp_rank: int, dp_world: int, speech) -> dict:
    """The rank's HeldOut share of every `eval.sources` entry."""
    from omni_train.data.heldout import HeldOut
    from omni_train.data.loader import ShardSet

    return {s.name: HeldOut(ShardSet.open(s.name, s.path, 1.0, tokenizer), dp_rank, dp_world, cfg.data.max_len,
                            cfg.trainer.micro_batch_size, tokenizer.pad_token_id, speech, cfg.eval.max_batches,
                            cfg.eval.workers)
            for s in cfg.eval.sources}


def evaluate(engine, module, sets: dict, counts_data: bool = True) -> dict[str, float]:
    """Held-out metrics of the module as it is now (see the module docstring). Collective."""
    was_training = module.training
    engine.eval()
    out: dict[str, float] = {}
    total_loss = total_units = 0.0
    try:
        with torch.no_grad():
            for name, held in sets.items():
                count = torch.tensor([len(held)], dtype=torch.int64)
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
                # summed on the device, read back once per source
                loss_sum, units, stats = torch.zeros(1, dtype=torch.float64, device=engine.device), 0.0, None
                for batch, weight in held.batches(int(count)):
                    loss, micro_stats = engine(**to_device(batch, engine.device))
                    loss_sum += weight * loss.detach().double()
                    units += weight * module.units(batch) * counts_data
                    part = weight * micro_stats.flatten().double()
                    stats = part if stats is None else stats + part
                numbers = torch.cat([loss_sum.cpu(), torch.tensor([units], dtype=torch.float64), stats.cpu()])
                torch.distributed.all_reduce(numbers)
                loss, units = numbers[0].item(), numbers[1].item()
                total_loss, total_units = total_loss + loss, total_units + units
                out[f"eval/{name}/loss"] = loss / max(units, 1.0)
                out[f"eval/{name}/{module.units_name}"] = int(units)
                out[f"eval/{name}/samples"] = held.samples
                out.update({f"eval/{name}/{k}": v for k, v in module.step_metrics(numbers[2:]).items()})
                out.update({f"eval/{name}/set_aside/{k}": n for k, n in _set_aside(held, counts_data).items()})
    finally:
        engine.train(was_training)
    out["eval/loss"] = total_loss / max(total_units, 1.0)
    return out


def _set_aside(held, counts_data: bool) -> dict[str, int]:
    """Samples of one source set aside, by reason, over all ranks (the reasons may differ by rank)."""
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, dict(held.set_aside) if counts_data else {})
    total: dict[str, int] = {}
    for share in shares:
        for reason, n in share.items():
            total[reason] = total.get(reason, 0) + n
    return total


def run(cfg) -> dict[str, float]:
    """Evaluate `model.path` as configured; every rank calls it."""
    from omni_train.config.validate import validate
    from omni_train.model.kernels.attention import SequenceParallel
    from omni_train.tokenizer import load_tokenizer
    from omni_train.train.distributed import init_distributed
    from omni_train.train.recipes import recipe

    validate(cfg)
    chosen = recipe(cfg.stage.objective)
    chosen.check(cfg)
    rank, world = init_distributed(cfg.trainer.startup_timeout_min)
    t = cfg.trainer
    sp = SequenceParallel(t.sequence_parallel) if t.sequence_parallel > 1 else None
    dp_rank, dp_world = (sp.dp_rank, sp.dp_world) if sp else (rank, world)
    tokenizer = load_tokenizer(cfg.model.path)
    sets = heldout_sets(cfg, tokenizer, dp_rank, dp_world, chosen.speech)
    trainee = chosen.build(cfg, world, sp)
    return evaluate(trainee.engine, trainee.module, sets, counts_data=sp is None or sp.rank == 0)
