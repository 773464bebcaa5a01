"""Semantic checks of a composed configuration: what its types cannot say (ranges, paths, divisibility, head counts
against the sequence-parallel degree), each failure one `ConfigError` line naming the key and the fix.

Sits above the model (it reads the preset's head counts); the objective's own checks live with its recipe
(omni_train/train/recipes), the checks against a run directory with the training layer
(omni_train.train.loop.preflight).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from omni_train.config.schema import Config, LauncherConfig
from omni_train.errors import ConfigError
from omni_train.files import is_complete
from omni_train.model.build import omni_config
from omni_train.model.kernels.attention import check_degree


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Semantic checks that types cannot express. Raises ConfigError naming the key and the fix."""
    t, m, d, ds = cfg.trainer, cfg.model, cfg.data, cfg.deepspeed
    for key in ("max_steps", "micro_batch_size", "grad_accum", "save_every", "keep_last", "max_nonfinite_steps"):
        _check(getattr(t, key) > 0, f"trainer.{key}={getattr(t, key)} must be a positive integer")
    _check(t.lr > 0, f"trainer.lr={t.lr} must be positive")
    _check(0 <= t.min_lr_ratio <= 1, f"trainer.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1]")
    _check(0 <= t.warmup_steps < t.max_steps, f"trainer.warmup_steps={t.warmup_steps} must lie in [0, max_steps)")
    _check(t.grad_clip >= 0, f"trainer.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    _check(t.logits_chunk >= 0, f"trainer.logits_chunk={t.logits_chunk} must be >= 0 (0: no tiling)")
    _check(t.checkpoint_every >= 2 or t.checkpointing != "selective",
           f"trainer.checkpoint_every={t.checkpoint_every} must be >= 2 for selective checkpointing (1 is full)")
    _check(not t.offload_activations or t.checkpointing != "none",
           "trainer.offload_activations=true needs trainer.checkpointing=selective or full: only checkpointed "
           "activations are offloaded")
    _check(t.mlp_chunk >= 0, f"trainer.mlp_chunk={t.mlp_chunk} must be >= 0 (0: no tiling)")
    for key in ("dist_timeout_min", "startup_timeout_min"):
        _check(getattr(t, key) > 0, f"trainer.{key}={getattr(t, key)} must be positive")
    if m.path is not None:
        _check(os.path.isdir(m.path), f"model.path={m.path} is not a directory: give a local checkpoint directory")
        _check(
            os.path.isfile(os.path.join(m.path, "config.json")) or is_complete(m.path),
            f"model.path={m.path} has no config.json and is no complete training checkpoint: give a Hugging Face "
            "checkpoint directory, an export, or RUN_DIR/checkpoints/step_N",
        )
    if m.compose.enabled:
        _check(m.path is None, "model.path and model.compose are exclusive: start from a checkpoint or compose one")
        for role in ("llm", "audio", "vision"):
            where = getattr(m.compose, role)
            _check(where is not None, f"model.compose.{role} is not set: composition needs llm, audio and vision")
            _check(os.path.isfile(os.path.join(where, "config.json")),
                   f"model.compose.{role}={where} is not a checkpoint directory (no config.json)")
    _check(d.pad_to_multiple_of > 0, f"data.pad_to_multiple_of={d.pad_to_multiple_of} must be positive")
    _check(
        d.max_len > 0 and d.max_len % d.pad_to_multiple_of == 0,
        f"data.max_len={d.max_len} must be a positive multiple of data.pad_to_multiple_of={d.pad_to_multiple_of}",
    )
    _check(len(d.sources) > 0, "data.sources is empty: name at least one shard directory (omni-prep build output)")
    _check_sources("data", d.sources)
    for s in d.sources:
        _check(s.weight > 0, f"data source {s.name}: weight={s.weight} must be positive")
    _check(d.chunk_samples > 0 and d.workers >= 0 and d.max_bad_samples >= 0,
           "data.chunk_samples must be positive; data.workers and data.max_bad_samples non-negative")
    _check_eval(cfg)
    _check(ds.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={ds.zero_stage} must be 0, 1, 2 or 3")
    world = cfg.launcher.nproc_per_node * cfg.launcher.nodes
    _check(ds.enabled or world == 1, f"deepspeed=none trains in one process, but the launcher asks for {world}: set "
                                     "launcher.nproc_per_node=1 (and nodes=1), or use deepspeed=zero3")
    _check(ds.enabled or cfg.trainer.precision in ("fp32", "auto") or cfg.stage.lora.enabled,
           f"deepspeed=none with trainer.precision={cfg.trainer.precision} trains LoRA adapters only (kept in fp32 "
           "beside the 16-bit base): set stage.lora.enabled=true, or trainer.precision=fp32, or use deepspeed=zero3 "
           "(fp32 master weights)")
    _check(
        ds.offload_param == "none" or ds.zero_stage == 3, "deepspeed.offload_param needs deepspeed.zero_stage=3"
    )
    _check(
        cfg.resume in ("none", "auto") or os.path.isdir(cfg.resume),
        f"resume={cfg.resume} must be none, auto, or an existing checkpoint directory",
    )
    _check(cfg.launcher.nproc_per_node > 0, f"launcher.nproc_per_node={cfg.launcher.nproc_per_node} must be positive")
    _check(cfg.launcher.nodes > 0, f"launcher.nodes={cfg.launcher.nodes} must be positive")
    _check_launcher(cfg.launcher)
    _check(len(cfg.stage.trainable) > 0, "stage.trainable is empty: list the parameter patterns that train")
    lora = cfg.stage.lora
    _check(not lora.enabled or (lora.r > 0 and lora.alpha > 0 and 0 <= lora.dropout < 1),
           f"stage.lora: r={lora.r} and alpha={lora.alpha} must be positive and dropout={lora.dropout} in [0, 1)")
    _check_sequence_parallel(cfg, cfg.launcher.nproc_per_node * cfg.launcher.nodes)


def _check_sources(group: str, sources) -> None:
    """`data.sources` or `eval.sources`: unique names, paths that exist (or patterns and URLs)."""
    names = [s.name for s in sources]
    _check(len(set(names)) == len(names), f"{group}.sources names repeat: {names}")
    for s in sources:
        _check(os.path.exists(s.path) or any(c in s.path for c in "*?{:"),
               f"{group} source {s.name}: {s.path} does not exist: build it with `omni-prep build SOURCE {s.path}`")


def _check_eval(cfg: Config) -> None:
    t, e = cfg.trainer, cfg.eval
    _check(t.eval_every >= 0 and e.max_batches >= 0 and e.workers >= 0,
           "trainer.eval_every, eval.max_batches and eval.workers must be non-negative")
    _check(t.eval_every == 0 or len(e.sources) > 0,
           f"trainer.eval_every={t.eval_every} but eval.sources is empty: name held-out shard sets "
           "('eval.sources=[{name:held,path:DIR}]') or set trainer.eval_every=0")
    _check(not t.keep_best or t.eval_every > 0, "trainer.keep_best=true needs evaluations: set trainer.eval_every")
    _check_sources("eval", e.sources)


def _check_launcher(la: LauncherConfig) -> None:
    _check(la.node_rank is None or 0 <= la.node_rank < la.nodes,
           f"launcher.node_rank={la.node_rank} must lie in [0, launcher.nodes={la.nodes})")
    _check(la.max_restarts >= 0, f"launcher.max_restarts={la.max_restarts} must be >= 0")
    host, _, port = la.rdzv_endpoint.rpartition(":")
    _check(bool(host) and port.isdigit(), f"launcher.rdzv_endpoint={la.rdzv_endpoint} must be host:port")
    if la.elastic:
        low, _, high = la.elastic.partition(":")
        _check(low.isdigit() and high.isdigit() and 0 < int(low) <= int(high),
               f"launcher.elastic={la.elastic} must be MIN:MAX nodes, 0 < MIN <= MAX")
    if la.name == "deepspeed":
        _check(la.hostfile is not None and os.path.isfile(la.hostfile),
               f"launcher.hostfile={la.hostfile} is not a file: DeepSpeed's launcher needs one ('host slots=N' lines)")
        _check(la.node_rank is None or la.nodes == 1 or la.master_addr is not None,
               f"launcher=deepspeed with launcher.node_rank={la.node_rank}: every node runs its own launcher (no ssh) "
               "and they meet at launcher.master_addr, which is not set: set it to node 0's address as the other "
               "nodes reach it (launcher.master_addr=node0)")
        slots = _hostfile_slots(la.hostfile)
        short = [h for h, n in list(slots.items())[: la.nodes] if n < la.nproc_per_node]  # DeepSpeed takes the first
        _check(len(slots) >= la.nodes and not short,
               f"launcher.hostfile={la.hostfile} lists {len(slots)} host(s) {list(slots.items())[:4]}: "
               f"the first launcher.nodes={la.nodes} need launcher.nproc_per_node={la.nproc_per_node} slots each")


def _hostfile_slots(path: str) -> dict[str, int]:
    """DeepSpeed's hostfile: `host slots=N` per line, `#` comments; a line in another form is an error."""
    slots: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#")[0].split()
        if not words:
            continue
        _check(len(words) == 2 and words[1].startswith("slots=") and words[1][6:].isdigit(),
               f"launcher.hostfile={path} line {number} ({line.strip()!r}) is not 'host slots=N'")
        slots[words[0]] = int(words[1][6:])
    return slots


def _check_sequence_parallel(cfg: Config, world: int) -> None:

    sp = cfg.trainer.sequence_parallel
    if sp == 1:
        return
    text = omni_config(cfg.model).thinker_config.text_config
    problem = check_degree(sp, text.num_attention_heads, text.num_key_value_heads)
    _check(problem is None, f"trainer.sequence_parallel={sp} cannot split attention: {problem}; choose a degree that "
           f"divides {text.num_attention_heads} query heads and divides or is a multiple of "
           f"{text.num_key_value_heads} key/value heads")
    _check(world % sp == 0, f"trainer.sequence_parallel={sp} must divide the number of processes ({world}): change "
           "launcher.nproc_per_node / launcher.nodes or the degree")
    _check(cfg.data.pad_to_multiple_of % sp == 0,
           f"data.pad_to_multiple_of={cfg.data.pad_to_multiple_of} must be a multiple of trainer.sequence_parallel={sp} "
           "so every rank holds the same number of tokens")
    _check(cfg.model.attn_implementation != "eager",
           "model.attn_implementation=eager builds a full L x L mask, which sequence parallelism cannot shard: use sdpa "
           "or flash_attention_2")


def check_world(cfg: Config, world: int) -> None:
    """Checks that need the real number of processes (known once the process group exists) or the machine the
    training runs on (`omni-launch` may run on a login node without its GPUs or packages)."""
    from transformers.utils import is_flash_attn_2_available

    _check(cfg.model.attn_implementation != "flash_attention_2" or is_flash_attn_2_available(),
           "model.attn_implementation=flash_attention_2, but this machine cannot run it (transformers finds no "
           "flash-attn package with a CUDA GPU): install flash-attn, or set model.attn_implementation=sdpa (omni-train's "
           "packed per-sample attention through torch's SDPA, no L x L mask)")
    _check(not cfg.logging.tensorboard or importlib.util.find_spec("tensorboard") is not None,
           "logging.tensorboard=true, but the tensorboard package is not installed on this machine: pip install "
           "'omni-train[tensorboard]' (or tensorboard), or set logging.tensorboard=false")
    _check(cfg.deepspeed.enabled or world == 1, f"deepspeed=none trains in one process, but {world} were started: "
                                                "start one (omni-launch launcher.nproc_per_node=1), or use deepspeed=zero3")
    _check_sequence_parallel(cfg, world)
