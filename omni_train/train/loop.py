"""The training loop: one loop for every stage.

Owns the order of a run, in parts that read top to bottom:
- `preflight`: every check that needs no process group (config, the objective's recipe, model.path's config and
  weight headers against the model, `stage.trainable` against its parameter names, every data and eval source's
  build (index, tokenizer, samples, shards), the data's speech, the run directory and the checkpoint to resume
  from); `omni-launch` calls it before it starts any process, and every rank again at start;
- `setup`: join the process group -> resume point -> tokenizer and data -> the recipe's module under its DeepSpeed
  engine -> restore the checkpoint -> metrics;
- `train_step`: one optimizer step, its loss normalised by the step's units (label tokens, codec targets or
  triplets) summed over ranks and accumulation steps; tests and benchmarks call this same function;
- `finish`: the export and `summary.json`.
`run` strings them together, with evaluations (omni_train/train/evaluate.py) and checkpoints between steps.
Stages differ in config and in their recipe (omni_train/train/recipes), never in a copy of this loop, and the loop
has no branch on the objective.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni_train.config.schema import Config
from omni_train.data.batch import to_device
from omni_train.errors import ConfigError, Diverged
from omni_train.files import write_json_atomic, write_text_atomic
from omni_train.train import checkpoint
from omni_train.train.export import ADAPTER_DIR


def preflight(cfg: Config):
    """Check a composed config before any process group exists; returns the objective's recipe."""
    from omni_train.config.validate import validate
    from omni_train.data.loader import check_sources, check_speech
    from omni_train.tokenizer import load_tokenizer
    from omni_train.train.engine import check_trainable
    from omni_train.train.recipes import recipe

    validate(cfg)
    chosen = recipe(cfg.stage.objective)
    chosen.check(cfg)
    check_trainable(chosen.trainable_names(cfg), cfg, chosen.lora_targets)
    tokenizer = load_tokenizer(cfg.model.path)
    check_sources(cfg.data.sources, tokenizer)
    check_sources(cfg.eval.sources, tokenizer, "eval.sources")
    check_speech(cfg.data.sources, chosen.speech)
    resume_from = _resume_point(cfg)
    if resume_from is not None:
        checkpoint.written_by(resume_from)  # a readable run state
        _check_base(cfg, resume_from)
    return chosen


def _base(cfg: Config) -> str | None:
    """What a LoRA checkpoint records of its frozen base (model.path's files), which it does not hold."""
    from omni_train.files import fingerprint

    return fingerprint(cfg.model.path) if cfg.stage.lora.enabled and cfg.model.path else None


def _check_base(cfg: Config, ckpt: Path) -> None:
    """A LoRA checkpoint resumes only on the base it was trained on: model.path's files as they were."""
    from omni_train.model.build import run_state

    state = run_state(ckpt)
    if state.get("adapters_only") and state.get("base") != _base(cfg):
        raise ConfigError(f"resume: {ckpt} holds LoRA adapters trained on model.path={cfg.model.path} as it was then, "
                          "and its files have changed since (the checkpoint does not hold the base): point "
                          "model.path at that base again, or start a new run_dir")


def _resume_point(cfg: Config) -> Path | None:
    if cfg.resume == "auto":
        ended = ended_as(cfg.run_dir)
        if ended.get("ended") == "diverged":
            raise Diverged(f"run_dir={cfg.run_dir} diverged ({ended.get('diverged', '')}); resume=auto would repeat "
                           "it. Resume from an earlier checkpoint with resume=PATH (after lowering trainer.lr), or "
                           "start a new run_dir")
        return checkpoint.latest(cfg.run_dir)
    if cfg.resume != "none":
        path = Path(cfg.resume)
        if not (path / checkpoint.MARKER).is_file():
            raise ConfigError(f"resume={path} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
        return path
    if cfg.launcher.max_restarts == 0 and checkpoint.complete_checkpoints(cfg.run_dir):
        raise ConfigError(f"run_dir={cfg.run_dir} already holds checkpoints: pass resume=auto to continue it, or "
                          "choose another run_dir")
    return None


def ended_as(run_dir: str | os.PathLike) -> dict:
    """How the run in `run_dir` last ended, from its summary.json ({} when it has none or it does not parse)."""
    import json

    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_config(cfg: Config, run_dir: Path) -> dict:
    """RUN_DIR/config.yaml (credentials redacted); a different earlier one is kept as config.N.yaml, never
    silently replaced."""
    from omegaconf import OmegaConf

    from omni_train.train.metrics import redact

    plain = redact(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True))
    text, path = OmegaConf.to_yaml(OmegaConf.create(plain)), run_dir / "config.yaml"
    if path.is_file() and path.read_text() != text:
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        path.rename(run_dir / f"config.{n}.yaml")
    write_text_atomic(path, text)
    return plain


def _quiet(rank: int) -> None:
    """Keep the console to the progress bar and real problems: library chatter only at warning level and up."""
    import logging
    import warnings

    import transformers

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    # torch.distributed renames its collectives; DeepSpeed still calls the old names on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    if rank != 0:
        warnings.filterwarnings("ignore")


@dataclass
class Step:
    """One optimizer step, summed over ranks: mean loss per unit, the units, the objective's metrics
    (`module.step_metrics`), the caller's `extra` counts, and whether the optimizer stepped (False: a non-finite
    loss or gradient norm on some rank, and the step was skipped on every rank)."""

    loss: float
    units: float
    metrics: dict[str, float]
    extra: list[float]
    applied: bool = True


def train_step(engine, module, batches: list[dict], world: int, counts_data: bool = True,
               extra: list[float] = (), update: bool = True) -> Step:
    """One optimizer step over this rank's micro-batches `batches` (DeepSpeed steps the optimizer after the last).
    Collective: every rank calls it, with as many micro-batches as the engine's gradient accumulation.

    Objectives return loss *sums*; the step's units (`module.units`) are all-reduced once, with `extra` counts riding
    along, and each micro-batch's loss is scaled so that the gradient is (sum over all ranks and micro-batches) /
    (units of the step): DeepSpeed's own division by accumulation steps and averaging over ranks are undone by the
    factor world x accumulation. `counts_data=False` on the ranks of a sequence-parallel group but its first (they
    read the same rows; their units and extras count once). `update=False` leaves the gradients in place instead of
    stepping the optimizer, for a caller that inspects them (one micro-batch only).

    Non-finite steps: the step's loss is all-reduced before the last backward. When it is not finite on some rank,
    every rank backpropagates it times NaN, so the accumulated gradients are NaN everywhere and DeepSpeed's own
    check of the global gradient norm skips the step (no weight, optimizer-state or scheduler change; gradients
    cleared) on every rank alike; a finite loss whose gradient norm is not finite is skipped the same way.
    `Step.applied` says which."""
    if not update and len(batches) != 1:
        raise ValueError("update=False takes exactly one micro-batch")
    local = torch.tensor([sum(module.units(b) for b in batches), *extra], dtype=torch.float64) * counts_data
    torch.distributed.all_reduce(local)
    units = local[0].item()
    scale = world * len(batches) / max(units, 1.0)
    # The micro-batches' figures are summed where the model computes them and read back once per step: a read per
    # micro-batch would make the host wait for the device each time.
    loss_sum = torch.zeros(1, dtype=torch.float64, device=engine.device)
    stats = reduced = None
    for i, batch in enumerate(batches):
        loss, micro_stats = engine(**to_device(batch, engine.device))
        loss_sum += loss.detach().double()
        micro_stats = micro_stats.detach().flatten()
        stats = micro_stats if stats is None else stats + micro_stats
        factor = scale
        if i == len(batches) - 1:
            # reduced on the CPU (gloo beside NCCL on GPUs: omni_train/train/distributed.py)
            reduced = torch.cat([loss_sum, stats]).cpu()
            torch.distributed.all_reduce(reduced)
            if update and not math.isfinite(reduced[0].item()):
                factor = float("nan")
        engine.backward(loss * factor)
        if update:
            engine.step()
    applied = not update or engine.was_step_applied()
    if update and applied and not math.isfinite(reduced[0].item()):
        raise RuntimeError("DeepSpeed stepped the optimizer on NaN gradients: this DeepSpeed does not skip a step "
                           "whose gradient norm is not finite (omni-train needs deepspeed>=0.19 for that)")
    return Step(reduced[0].item() / max(units, 1.0), units, module.step_metrics(reduced[1:]), local[1:].tolist(),
                applied)


@dataclass
class Run:
    """A run once set up: what the steps and `finish` need."""

    cfg: Config
    rank: int
    world: int
    recipe: object
    trainee: object
    loader: object
    tokenizer: object
    metrics: object
    timeouts: object
    counts: dict[str, int]
    local_params: list[int]
    start_step: int
    last_checkpoint: Path | None
    counts_data: bool
    heldout: dict = field(default_factory=dict)  # eval source name -> this rank's HeldOut share
    best: dict | None = None  # {"step", "eval_loss"} of the best evaluation so far (trainer.keep_best)
    evals: dict[int, float] = field(default_factory=dict)  # eval/loss by step
    losses: dict[int, float] = field(default_factory=dict)
    history: dict[int, dict[str, float]] = field(default_factory=dict)
    real_tokens: float = 0.0
    capacity: float = 0.0
    mixture: dict[str, float] = field(default_factory=dict)
    corrupt_reported: int = 0
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    nonfinite_in_a_row: int = 0
    last_finite: tuple[int, float] | None = None  # (step, loss) of the last step that updated the weights
    base: str | None = None  # LoRA: the fingerprint of model.path's files (checkpoints hold the adapters only)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def sources(self) -> list[str]:
        return [s.name for s in self.cfg.data.sources]


def setup(cfg: Config) -> Run:
    """Everything before the first step; every rank calls it."""
    from omni_train.config.validate import check_world
    from omni_train.data.loader import build_rank_loader
    from omni_train.model.build import param_counts
    from omni_train.model.kernels.attention import SequenceParallel
    from omni_train.tokenizer import load_tokenizer
    from omni_train.train.memory import warn_if_too_big
    from omni_train.train.distributed import Timeouts, init_distributed
    from omni_train.train.engine import precision
    from omni_train.train.metrics import Metrics

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) or int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if (restarted or cfg.launcher.max_restarts) and cfg.resume == "none":
        # A job that may restart continues from its newest complete checkpoint, on every node alike (a replaced
        # node's fresh agent counts no restart of its own), and starts from scratch when there is none.
        cfg.resume = "auto"
    recipe = preflight(cfg)
    t = cfg.trainer
    rank, world = init_distributed(t.startup_timeout_min)
    timeouts = Timeouts(t.startup_timeout_min, t.dist_timeout_min)
    _quiet(rank)
    check_world(cfg, world)
    t.precision = precision(cfg)  # `auto` resolved for this device: saved with the config, so a resume keeps it
    sp = SequenceParallel(t.sequence_parallel) if t.sequence_parallel > 1 else None
    # Ranks of a sequence-parallel group read the same rows; only the group's first rank counts data statistics.
    dp_rank, dp_world = (sp.dp_rank, sp.dp_world) if sp else (rank, world)
    torch.manual_seed(t.seed)
    run_dir = Path(cfg.run_dir)
    resume_from = _resume_point(cfg)
    plain_config = {}
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").unlink(missing_ok=True)  # how an earlier attempt ended no longer holds
        checkpoint.remove_incomplete(cfg.run_dir)
        plain_config = _save_config(cfg, run_dir)
    torch.distributed.barrier()

    tokenizer = load_tokenizer(cfg.model.path)
    loader = build_rank_loader(cfg.data, tokenizer, dp_rank, dp_world, t.seed, rows=t.micro_batch_size,
                               speech=recipe.speech)
    heldout = {}
    if t.eval_every:
        from omni_train.train.evaluate import heldout_sets

        heldout = heldout_sets(cfg, tokenizer, dp_rank, dp_world, recipe.speech)
    if resume_from is not None and checkpoint.written_by(resume_from) != world:
        # another number of ranks: the engine loads DeepSpeed's universal copy of the checkpoint (resharded)
        cfg.deepspeed.extra = {**cfg.deepspeed.extra, "checkpoint": {
            **cfg.deepspeed.extra.get("checkpoint", {}), "load_universal": True}}
    trainee = recipe.build(cfg, world, sp)
    counts = param_counts(trainee.module)
    local_params = [None] * world
    torch.distributed.all_gather_object(local_params, counts["local"])
    start_step, best, nonfinite, lr_changed = 0, None, 0, None
    if resume_from is not None:
        state = checkpoint.load(trainee.engine, resume_from)
        start_step, best, nonfinite = state["step"], state.get("best"), state.get("nonfinite_steps", 0)
        lr_changed = _apply_lr(trainee.scheduler, t.lr)
        saved = state["loader"]
        if (saved["world"], saved["workers"]) == (loader.world, loader.workers):
            loader.load_state_dict(saved)
        else:  # another layout: the rest of each old slot's epoch is dealt out to the new slots
            loader.redeal(checkpoint.loader_states(resume_from))
    metrics = Metrics(cfg.logging, cfg.run_dir, rank, t.max_steps, start_step, plain_config)
    if resume_from is not None and lr_changed is not None:
        metrics.info(f"trainer.lr={t.lr} replaces the checkpoint's peak learning rate {lr_changed} from step "
                     f"{start_step + 1}")
    if resume_from is not None and state.get("resharded"):
        old = state["resharded"]
        metrics.info(f"resumed {resume_from} (written by {old} rank{'s' * (old != 1)}) on {world}: weights, optimizer "
                     "state and schedule resharded; the rest of the epoch re-dealt to the new data slots")
    warn_if_too_big(cfg, metrics.warn)
    metrics.info(f"stage {cfg.stage.name}: {counts['trainable']:,} of {counts['total']:,} parameters train; "
                 f"{world} ranks, sequence parallel {t.sequence_parallel}, rows of {cfg.data.max_len} tokens")
    return Run(cfg, rank, world, recipe, trainee, loader, tokenizer, metrics, timeouts, counts, local_params,
               start_step, resume_from, counts_data=sp is None or sp.rank == 0, heldout=heldout, best=best,
               mixture=dict.fromkeys([s.name for s in cfg.data.sources], 0.0), nonfinite_steps=nonfinite,
               base=_base(cfg))


def _apply_lr(scheduler, lr: float) -> float | None:
    """After a checkpoint restored the schedule: a `trainer.lr` other than the checkpoint's takes effect from the
    next step (the schedule's shape and position are kept, its peak is the new one). Returns the replaced peak."""
    if all(base == lr for base in scheduler.base_lrs):
        return None
    old = scheduler.base_lrs[0]
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    now = [lr * f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, value in zip(scheduler.optimizer.param_groups, now):
        group["lr"] = value
    scheduler._last_lr = now
    return old


def _shares(counts: dict[str, float]) -> dict[str, float]:
    """Each source's share of the samples delivered so far (the realised mixture)."""
    total = max(1.0, sum(counts.values()))
    return {name: n / total for name, n in counts.items()}


def _step(run: Run, step: int, micro: list) -> None:
    """One step of the run: `train_step` with the loader's counts riding along in its all-reduce, then metrics."""
    from omni_train.train.metrics import peak_memory_gb

    t, names = run.cfg.trainer, run.sources
    started = time.perf_counter()
    skipped = micro[-1].state.skipped
    extra = ([sum(mb.real_tokens for mb in micro), sum(mb.capacity for mb in micro)]
             + [sum(mb.sources.get(name, 0) for mb in micro) for name in names]
             + [sum(n for k, n in skipped.items() if k.startswith(f"{name}: ")) for name in names])
    lr = run.trainee.scheduler.get_last_lr()[0]
    done = train_step(run.trainee.engine, run.trainee.module, [mb.batch for mb in micro], run.world,
                      run.counts_data, extra)
    tokens, capacity = done.extra[:2]
    delivered = done.extra[2:2 + len(names)]
    corrupt = dict(zip(names, map(int, done.extra[2 + len(names):])))
    if sum(corrupt.values()) > run.corrupt_reported:
        run.metrics.warn(f"corrupt samples set aside so far, by source: {corrupt} (reasons by rank in the "
                         "checkpoint's loader state)")
    run.corrupt_reported = sum(corrupt.values())
    run.real_tokens, run.capacity = run.real_tokens + tokens, run.capacity + capacity
    for name, n in zip(names, delivered):
        run.mixture[name] += n
    run.losses[step], run.history[step] = done.loss, done.metrics
    if done.applied:
        run.nonfinite_in_a_row, run.last_finite = 0, (step, done.loss)
    else:
        run.nonfinite_steps += 1
        run.nonfinite_in_a_row += 1
        run.metrics.warn(f"step {step}: loss {done.loss} or the gradient norm is not finite; the step is skipped on "
                         f"every rank ({run.nonfinite_in_a_row} in a row, {t.max_nonfinite_steps} stop the run)")
    peak = torch.tensor([peak_memory_gb()])
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    elapsed = time.perf_counter() - started
    grad_norm = run.trainee.engine.get_global_grad_norm()
    run.metrics.log({
        "step": step, "loss": done.loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
        run.trainee.module.units_name: int(done.units), "tokens": int(tokens), "tokens_per_s": tokens / elapsed,
        "step_time_s": elapsed, "packing_efficiency": tokens / capacity, "peak_mem_gb": peak.item(),
        "epoch": max(e for mb in micro for e in mb.epochs), "skipped": not done.applied,
        **done.metrics,
        **{f"corrupt/{name}": n for name, n in corrupt.items()},
        **{f"mixture/{name}": share for name, share in _shares(run.mixture).items()},
    })
    if run.nonfinite_in_a_row >= t.max_nonfinite_steps:
        last = (f"the last finite loss was {run.last_finite[1]:.6g} at step {run.last_finite[0]}" if run.last_finite
                else "no step of this run had a finite loss")
        raise Diverged(f"the run diverged: steps {step - run.nonfinite_in_a_row + 1}-{step} had a non-finite loss or "
                       f"gradient norm and were skipped (trainer.max_nonfinite_steps={t.max_nonfinite_steps}); "
                       f"{last}. Lower trainer.lr (or raise trainer.warmup_steps) and resume from a checkpoint "
                       "before the divergence with resume=PATH")


def _evaluate(run: Run, step: int) -> bool:
    """Evaluate on the held-out sets and log it; True when trainer.keep_best should keep this step (never step 0:
    the starting model is model.path, not a checkpoint of this run)."""
    from omni_train.train.evaluate import evaluate

    record = evaluate(run.trainee.engine, run.trainee.module, run.heldout, run.counts_data)
    run.evals[step] = record["eval/loss"]
    run.metrics.log_eval(step, record)
    if not run.cfg.trainer.keep_best or step == 0 or (run.best is not None
                                                       and record["eval/loss"] >= run.best["eval_loss"]):
        return False
    run.best = {"step": step, "eval_loss": record["eval/loss"]}
    return True


def check_finite_weights(engine, step: int, what: str, newest: Path | None) -> None:
    """Refuse to write a checkpoint or an export (`what`) of weights that are not all finite: every rank checks its
    own partitions of the trainable parameters and the count is all-reduced, so every rank raises Diverged alike."""
    bad = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for p in engine.module.parameters():
            if p.requires_grad:
                local = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
                bad += (~torch.isfinite(local)).sum().double().cpu()
    torch.distributed.all_reduce(bad)
    if bad.item():
        raise Diverged(f"after step {step}, {int(bad.item())} trainable weights are not finite: no {what} is written "
                       f"from them; the newest checkpoint is {newest or 'none'}. Lower trainer.lr and resume from a "
                       "checkpoint before the divergence with resume=PATH")


def _save(run: Run, step: int) -> None:
    check_finite_weights(run.trainee.engine, step, "checkpoint", run.last_checkpoint)
    with run.timeouts.unequal_work():
        kept = (run.best["step"],) if run.best else ()
        run.last_checkpoint = checkpoint.save(run.trainee.engine, run.cfg.run_dir, step, run.loader.state_dict(),
                                              run.cfg.trainer.keep_last,
                                              {"best": run.best, "nonfinite_steps": run.nonfinite_steps,
                                               "base": run.base},
                                              protect=kept, adapters_only=run.cfg.stage.lora.enabled)
    if run.best and run.rank == 0:
        best = checkpoint.tag(run.best["step"])
        write_json_atomic(run.run_dir / "checkpoints" / "best.json", {**run.best, "checkpoint": best})


def finish(run: Run, diverged: Diverged | None = None) -> dict:
    """The export (when configured, and not after a divergence) and the stage summary, written by rank 0; returned
    on every rank. `ended` says how the run ended: `completed`, or `diverged` with the reason."""
    cfg, t = run.cfg, run.cfg.trainer
    if t.export and diverged is None:
        check_finite_weights(run.trainee.engine, t.max_steps, "export", run.last_checkpoint)
        with run.timeouts.unequal_work():
            run.trainee.export(run.run_dir / "export", run.tokenizer)
    summary = {
        "ended": "completed" if diverged is None else "diverged",
        **({"diverged": str(diverged)} if diverged is not None else {}),
        "steps": t.max_steps,
        "resumed_from_step": run.start_step,
        "first_loss": run.losses.get(1),
        "last_loss": run.losses.get(t.max_steps),
        "last_finite_step": run.last_finite[0] if run.last_finite else None,
        "nonfinite_steps": run.nonfinite_steps,
        "trainable_params": run.counts["trainable"],
        "total_params": run.counts["total"],
        "world_size": run.world,
        "sequence_parallel": t.sequence_parallel,
        "local_params_per_rank": run.local_params,
        "packing_efficiency": run.real_tokens / run.capacity if run.capacity else None,
        "mixture": _shares(run.mixture),
        # as first_loss / last_loss: the evaluations before step 1 and after the last step (None after a resume)
        **({"first_eval_loss": run.evals.get(0), "last_eval_loss": run.evals.get(t.max_steps)} if run.evals else {}),
        **({"best_eval": run.best} if run.best else {}),
        "objective": str(cfg.stage.objective),
        **run.recipe.summary(run.history, run.start_step + 1, t.max_steps),
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
        "export": str(run.run_dir / "export") if t.export and diverged is None else None,
        **({"adapter": str(run.run_dir / ADAPTER_DIR) if t.export and diverged is None else None}
           if cfg.stage.lora.enabled else {}),
    }
    if run.rank == 0:
        write_json_atomic(run.run_dir / "summary.json", summary)
    torch.distributed.barrier()
    return summary


def run(cfg: Config) -> dict:
    """Train one stage as configured; every rank calls it. Returns the stage summary (on every rank); raises
    Diverged (after writing the summary) when the run diverged."""
    r = setup(cfg)
    t = cfg.trainer
    batches = iter(r.loader)
    r.trainee.engine.train()
    try:
        if t.eval_every and r.start_step == 0:
            _evaluate(r, 0)  # where the stage starts from
        for step in range(r.start_step + 1, t.max_steps + 1):
            _step(r, step, [next(batches) for _ in range(t.grad_accum)])
            if step == r.start_step + 1:
                r.timeouts.steps()  # the first step's lazy allocations are behind: a silent peer is a lost one now
            best = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.max_steps) and _evaluate(r, step)
            if best or step % t.save_every == 0 or step == t.max_steps:
                _save(r, step)
    except Diverged as e:
        batches.close()
        r.metrics.close()
        finish(r, e)
        raise
    batches.close()  # stop the decoding workers now rather than at garbage collection
    r.metrics.close()
    return finish(r)
