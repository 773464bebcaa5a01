"""The training loop: one loop for every stage, and the `omni-train` entry point.

Owns the order of a run: validate config -> join the process group -> resume point -> tokenizer and data ->
model under ZeRO-3 -> freeze -> DeepSpeed engine -> steps (accumulation, loss normalised by the step's real label
tokens across ranks) -> checkpoints -> export -> `summary.json`. Stages differ only in config (which parameters
train, which data, which objective), never in a copy of this loop.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch

from omni_train import checkpoint
from omni_train.config import Config, ConfigError, check_world, register, validate
from omni_train.files import write_json_atomic, write_text_atomic


def _save_config(cfg: Config, run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    from omni_train.metrics import redact

    plain = redact(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))
    return plain


def _resume_point(cfg: Config) -> Path | None:
    if cfg.resume == "auto":
        return checkpoint.latest(cfg.run_dir)
    if cfg.resume != "none":
        path = Path(cfg.resume)
        if not (path / checkpoint.MARKER).is_file():
            raise ConfigError(f"resume={path} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
        return path
    return None


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


def peak_memory_gb() -> float:
    """This process's peak memory so far: CUDA's max allocated on GPU, max resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _shares(counts: dict[str, float]) -> dict[str, float]:
    """Each source's share of the samples delivered so far (the realised mixture)."""
    total = max(1.0, sum(counts.values()))
    return {name: n / total for name, n in counts.items()}


def thinker_engine(cfg: Config, world: int, sp=None):
    """The Thinker objective under its DeepSpeed engine, as configured: (engine, ThinkerLM, LR scheduler).
    `sp`: the run's omni_train.attention.SequenceParallel, or None."""
    from omni_train import activations
    from omni_train.attention import use_packed_attention
    from omni_train.engine import deepspeed_config, freeze, initialize
    from omni_train.model import build_thinker
    from omni_train.objectives import ThinkerLM

    ds_config = deepspeed_config(cfg, world)
    thinker = build_thinker(cfg.model, ds_config)
    activations.apply(thinker, cfg.trainer)
    if sp is not None:
        sp.attach(thinker.model.language_model, cfg.trainer.micro_batch_size, cfg.model.attn_implementation)
    elif cfg.model.attn_implementation == "sdpa":
        use_packed_attention(thinker.model.language_model)
    module = ThinkerLM(thinker, sp, cfg.trainer.logits_chunk)
    freeze(module, list(cfg.stage.trainable))
    engine, _, scheduler = initialize(cfg, module, ds_config)
    return engine, module, scheduler


def talker_engine(cfg: Config, world: int):
    """The Talker objective (talker_sft or talker_dpo) under its DeepSpeed engine: (engine, TalkerLM, scheduler).
    The Thinker is frozen; for DPO a frozen reference Talker with the starting weights joins the module (ZeRO-3
    partitions it like the rest) unless the shards carry precomputed reference log-probs."""
    from omni_train import activations
    from omni_train.attention import use_packed_attention
    from omni_train.engine import deepspeed_config, freeze, initialize
    from omni_train.model import build_talker, build_thinker, load_speakers
    from omni_train.talker import TalkerLM

    objective = cfg.stage.objective
    ds_config = deepspeed_config(cfg, world)
    thinker = build_thinker(cfg.model, ds_config)
    talker, loaded = build_talker(cfg.model, ds_config)
    if objective == "talker_dpo" and not loaded:
        raise ConfigError(f"talker_dpo starts from a trained Talker, but model.path={cfg.model.path} holds none: "
                          "point it at a talker_sft export (or a released Qwen2.5-Omni checkpoint)")
    reference = None
    if objective == "talker_dpo" and cfg.talker.reference == "model":
        reference, _ = build_talker(cfg.model, ds_config)
    activations.checkpointing(talker, cfg.trainer)  # the Thinker runs without gradient: nothing to keep
    if cfg.model.attn_implementation == "sdpa":
        for model in (thinker.model.language_model, talker.model, *([reference.model] if reference else [])):
            use_packed_attention(model)
    voices = load_speakers(cfg.model, cfg.talker.speaker)
    speakers = {name: int(entry["bos_token"]) for name, entry in voices.items()}
    module = TalkerLM(thinker, talker, objective, speakers, cfg.talker.speaker, reference, cfg.talker.beta,
                      cfg.talker.sft_weight, cfg.trainer.logits_chunk)
    module.voices = voices  # the whole spk_dict (Token2Wav's conditioning too), for the export
    freeze(module, list(cfg.stage.trainable))
    stray = [n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("talker.")]
    if stray:
        raise ConfigError(f"a Talker stage trains the Talker only; stage.trainable also matches {stray[:3]}...: "
                          "use stage.trainable=[talker] (or patterns under talker.)")
    engine, _, scheduler = initialize(cfg, module, ds_config)
    return engine, module, scheduler


def run(cfg: Config) -> dict:
    """Train one stage as configured; every rank calls it. Returns the stage summary (on every rank)."""
    from omni_train.attention import SequenceParallel
    from omni_train.engine import init_distributed
    from omni_train.export import export_pretrained
    from omni_train.keymap import hub_name
    from omni_train.loader import NEEDS_SPEECH, build_rank_loader, check_speech
    from omni_train.metrics import Metrics
    from omni_train.model import param_counts
    from omni_train.plan import warn_if_too_big
    from omni_train.tokenizer import load_tokenizer

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) or int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if (restarted or cfg.launcher.max_restarts) and cfg.resume == "none":
        # A job that may restart continues from its newest complete checkpoint, on every node alike (a replaced
        # node's fresh agent counts no restart of its own), and starts from scratch when there is none.
        cfg.resume = "auto"
    validate(cfg)
    t = cfg.trainer
    rank, world = init_distributed(t.dist_timeout_min)
    _quiet(rank)
    check_world(cfg, world)
    sp = SequenceParallel(t.sequence_parallel) if t.sequence_parallel > 1 else None
    # Ranks of a sequence-parallel group read the same rows; only the group's first rank counts data statistics.
    dp_rank, dp_world = (sp.dp_rank, sp.dp_world) if sp else (rank, world)
    counts_data = sp is None or sp.rank == 0
    torch.manual_seed(t.seed)
    run_dir = Path(cfg.run_dir)
    resume_from = _resume_point(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_incomplete(cfg.run_dir)
        plain_config = _save_config(cfg, run_dir)
    torch.distributed.barrier()

    tokenizer = load_tokenizer(cfg.model.path)
    objective = cfg.stage.objective
    speech = NEEDS_SPEECH[objective]
    check_speech(cfg.data.sources, speech)
    loader = build_rank_loader(cfg.data, tokenizer, dp_rank, dp_world, t.seed, rows=t.micro_batch_size,
                               speech=speech)
    source_names = [s.name for s in cfg.data.sources]

    token2wav = None
    if objective != "thinker" and t.export:
        from omni_train.model import build_token2wav

        # Built before any ZeRO-3 construction: once DeepSpeed's zero.Init has run in this process, it may still
        # partition parameters created later (Token2Wav is not trained and must stay whole for the export).
        token2wav = build_token2wav(cfg.model)
    engine, module, scheduler = thinker_engine(cfg, world, sp) if objective == "thinker" else \
        talker_engine(cfg, world)
    counts = param_counts(module)
    local_params = [None] * world
    torch.distributed.all_gather_object(local_params, counts["local"])

    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from)
        start_step = state["step"]
        loader.load_state_dict(state["loader"])
    metrics = Metrics(cfg.logging, cfg.run_dir, rank, t.max_steps, start_step,
                      plain_config if rank == 0 else {})
    warn_if_too_big(cfg, metrics.warn)
    metrics.info(f"stage {cfg.stage.name}: {counts['trainable']:,} of {counts['total']:,} parameters train; "
                 f"{world} ranks, sequence parallel {t.sequence_parallel}, rows of {cfg.data.max_len} tokens")

    losses: dict[int, float] = {}
    history: dict[int, dict[str, float]] = {}
    last_ckpt = resume_from
    real_total = capacity_total = 0.0
    mixture = dict.fromkeys(source_names, 0.0)
    corrupt_reported = 0
    batches = iter(loader)
    engine.train()
    for step in range(start_step + 1, t.max_steps + 1):
        started = time.perf_counter()
        micro = [next(batches) for _ in range(t.grad_accum)]
        # One all-reduce per step: label tokens, real tokens, row capacity, then per source the samples delivered
        # this step and the corrupt samples set aside so far.
        skipped_local = micro[-1].state.skipped
        counts_local = torch.tensor(
            [sum(module.units(mb.batch) for mb in micro), sum(mb.real_tokens for mb in micro),
             sum(mb.capacity for mb in micro)]
            + [sum(mb.sources.get(name, 0) for mb in micro) for name in source_names]
            + [sum(n for k, n in skipped_local.items() if k.startswith(f"{name}: ")) for name in source_names],
            dtype=torch.float64,
        ) * counts_data
        torch.distributed.all_reduce(counts_local)
        step_units, step_tokens, step_capacity = counts_local[:3].tolist()
        delivered = counts_local[3 : 3 + len(source_names)].tolist()
        corrupt = dict(zip(source_names, map(int, counts_local[3 + len(source_names) :].tolist())))
        real_total, capacity_total = real_total + step_tokens, capacity_total + step_capacity
        for name, n in zip(source_names, delivered):
            mixture[name] += n
        if rank == 0 and sum(corrupt.values()) > corrupt_reported:
            metrics.warn(f"corrupt samples set aside so far, by source: {corrupt} (reasons by rank in the "
                         "checkpoint's loader state)")
        corrupt_reported = sum(corrupt.values())
        # DeepSpeed divides by grad_accum and averages over ranks; this factor turns that into sum / step_units
        # (label tokens for the Thinker, codec targets or triplets for the Talker).
        scale = world * t.grad_accum / max(step_units, 1.0)
        lr = scheduler.get_last_lr()[0]
        stats = None
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for mb in micro:
            micro_loss, micro_stats = engine(**mb.batch)
            engine.backward(micro_loss * scale)
            engine.step()
            loss_sum += micro_loss.detach().double()
            stats = micro_stats.flatten() if stats is None else stats + micro_stats.flatten()
        reduced = torch.cat([loss_sum, stats])
        torch.distributed.all_reduce(reduced)
        loss = reduced[0].item() / max(step_units, 1.0)
        step_extra = module.step_metrics(reduced[1:])
        losses[step] = loss
        history[step] = step_extra
        peak = torch.tensor([peak_memory_gb()])
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        elapsed = time.perf_counter() - started
        grad_norm = engine.get_global_grad_norm()
        metrics.log({
            "step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
            module.units_name: int(step_units), "tokens": int(step_tokens), "tokens_per_s": step_tokens / elapsed,
            "step_time_s": elapsed, "packing_efficiency": step_tokens / step_capacity, "peak_mem_gb": peak.item(),
            "epoch": max(e for mb in micro for e in mb.epochs),
            **step_extra,
            **{f"corrupt/{name}": n for name, n in corrupt.items()},
            **{f"mixture/{name}": share for name, share in _shares(mixture).items()},
        })
        if step % t.save_every == 0 or step == t.max_steps:
            last_ckpt = checkpoint.save(engine, cfg.run_dir, step, loader.state_dict(), t.keep_last)
    batches.close()  # stop the decoding workers now rather than at garbage collection
    metrics.close()

    if t.export and objective == "thinker":
        export_pretrained(module.thinker, run_dir / "export", tokenizer, rename=hub_name)
    elif t.export:
        from omni_train.export import export_omni
        from omni_train.model import omni_config

        export_omni(module.thinker, module.talker, token2wav, omni_config(cfg.model), module.voices,
                    run_dir / "export", tokenizer)
    summary = {
        "steps": t.max_steps,
        "resumed_from_step": start_step,
        "first_loss": losses.get(1),
        "last_loss": losses.get(t.max_steps),
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "world_size": world,
        "sequence_parallel": t.sequence_parallel,
        "local_params_per_rank": local_params,
        "packing_efficiency": real_total / capacity_total if capacity_total else None,
        "mixture": _shares(mixture),
        "objective": objective,
        **({"first_reward_accuracy": history[start_step + 1].get("dpo/reward_accuracy"),
            "last_reward_accuracy": history[t.max_steps].get("dpo/reward_accuracy"),
            "last_margin": history[t.max_steps].get("dpo/margin")}
           if objective == "talker_dpo" and t.max_steps in history and start_step + 1 in history else {}),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "export": str(run_dir / "export") if t.export else None,
    }
    if rank == 0:
        write_json_atomic(run_dir / "summary.json", summary)
    torch.distributed.barrier()
    return summary


def _entry(dict_cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    cfg: Config = OmegaConf.to_object(dict_cfg)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.run_dir = HydraConfig.get().runtime.output_dir
    from omni_train.engine import shutdown

    try:
        run(cfg)
        shutdown()
    except ConfigError as e:  # Hydra would print a trace for an exception; a user error gets one line
        print(f"omni-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (torch.distributed.DistError, RuntimeError) as e:
        if not _lost_peer(e):
            raise
        # A peer died (connection closed) or stopped answering (trainer.dist_timeout_min): this rank names it (from
        # the heartbeats) and stops too; with launcher.max_restarts the job restarts and resumes from the newest
        # complete checkpoint.
        from omni_train import liveness

        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        print(f"omni-train: rank {rank} (host {socket.gethostname()}): lost contact with a peer in a collective "
              f"({str(e).splitlines()[0][:200]}); {liveness.lost_peers(rank, world)}; stopping", file=sys.stderr)
        liveness.stop()
        sys.exit(3)


# What gloo and NCCL say when a peer process or node is gone or silent.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL communicator")


def _lost_peer(error: Exception) -> bool:
    return isinstance(error, torch.distributed.DistError) or any(s in str(error) for s in PEER_LOST)


def main() -> None:
    import hydra

    if sys.argv[1:2] == ["plan"]:
        from omni_train.plan import main as plan

        sys.exit(plan(sys.argv[2:]))
    if sys.argv[1:2] == ["pairs"]:
        from omni_train.pairs import main as pairs

        sys.exit(pairs(sys.argv[2:]))
    register()
    hydra.main(version_base=None, config_path="pkg://omni_train.conf", config_name="config")(_entry)()


if __name__ == "__main__":
    main()
