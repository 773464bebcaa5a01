"""Structured configuration: the schema behind every Hydra config group, and its validation.

Owns: one dataclass per config group (`model/`, `deepspeed/`, `trainer`, `data/`, `stage/`, `logging`), registered
with Hydra's ConfigStore so that an unknown key or a wrongly typed value fails at composition, and `validate`,
which checks what types cannot (ranges, paths, divisibility) and raises `ConfigError` with one clear line before
any process group starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A problem with the user's configuration, input data or environment: reported as one line, no trace."""


@dataclass
class ComposeConfig:
    # Local checkpoint directories (Hugging Face layout): a Qwen2.5 LLM (Qwen2ForCausalLM), a Whisper model
    # (WhisperModel or WhisperForConditionalGeneration; its encoder is used) and Qwen2.5-VL (its vision tower).
    # All three or none.
    llm: Optional[str] = None
    audio: Optional[str] = None
    vision: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return any((self.llm, self.audio, self.vision))


@dataclass
class ModelConfig:
    preset: str = MISSING
    # A local Hugging Face checkpoint directory; None initialises the preset randomly (or composes, below).
    path: Optional[str] = None
    # Stage-1 initialisation by composition (omni_train/keymap.py lists the key mapping); exclusive with `path`.
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    # Keyword arguments of transformers' Qwen2_5OmniConfig (thinker_config, talker_config, token2wav_config).
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeepSpeedConfig:
    name: str = MISSING
    zero_stage: int = 3
    offload_optimizer: str = "none"
    offload_param: str = "none"
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    # Merged verbatim into the generated DeepSpeed JSON, for settings this schema does not name.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_steps: int = 30
    micro_batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    save_every: int = 10
    keep_last: int = 2
    export: bool = True
    # Minutes a collective may wait for a peer before the job stops (torch's default is 30).
    dist_timeout_min: float = 10.0
    # Ranks that share one packed row, each holding 1/N of its tokens (Ulysses; 1 = off). It must divide the
    # world size and data.pad_to_multiple_of, and split the attention heads (see omni_train/attention.py).
    sequence_parallel: int = 1
    # Labelled tokens per tile of the fused LM head + cross-entropy (omni_train/head_loss.py); 0 forms all their
    # logits at once (the plain path); the Talker's codec head likewise. Same loss and gradients either way. A tile
    # holds ~12 x 152k bytes per token at its peak (1024: 1.7 GiB).
    logits_chunk: int = 1024
    # Activation checkpointing (omni_train/activations.py): none | selective (every `checkpoint_every`-th layer) |
    # full (every layer); `offload_activations` keeps the checkpointed inputs in host memory.
    checkpointing: str = "none"
    checkpoint_every: int = 2
    offload_activations: bool = False
    # Tokens per tile of the language model's MLPs (DeepSpeed's TiledMLP); 0 runs them whole.
    mlp_chunk: int = 0


@dataclass
class SourceConfig:
    name: str = MISSING
    # Shards made by `omni-prep build`: its output directory, a glob, a brace list or URLs webdataset opens.
    path: str = MISSING
    # Mixing weight; the realised mixture is logged.
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = MISSING
    sources: list[SourceConfig] = MISSING
    # Packed row length; samples are packed whole, a longer sample is set aside and counted.
    max_len: int = 8192
    # Rows are a multiple of this long (attention kernels want multiples of 8 or 64).
    pad_to_multiple_of: int = 64
    # Samples shuffled and packed together (the shuffle window). Larger packs tighter (8192 gave >= 99.4% at 8k
    # and 32k rows in benchmarks/packing_efficiency.py) and costs their compressed bytes in memory per worker.
    chunk_samples: int = 2048
    # Decoding worker processes per rank (0: decode in the training process).
    workers: int = 2
    # Corrupt samples in a row before the run stops.
    max_bad_samples: int = 100
    # False: each epoch a permutation of the shards (every sample once per epoch per slot); True: shards drawn
    # with replacement (resampled, for mixtures whose sources should not run in lockstep with their sizes).
    resample: bool = False


@dataclass
class StageConfig:
    name: str = MISSING
    # Glob-style patterns of parameter names that train, or module groups (llm, audio_encoder, vision_encoder,
    # audio_adapter, vision_adapter; omni_train/engine.py GROUPS); everything else is frozen. ["*"] trains all.
    trainable: list[str] = field(default_factory=lambda: ["*"])
    # What trains (omni_train/talker.py): thinker (next-token LM), talker_sft (next codec token on the frozen
    # Thinker's states) or talker_dpo (DPO on speech preference triplets).
    objective: str = "thinker"


@dataclass
class TalkerConfig:
    # DPO temperature (the paper does not disclose its value; TRL's default).
    beta: float = 0.1
    # Weight of the chosen sequence's mean codec cross-entropy added to each triplet's DPO loss (0: pure DPO).
    sft_weight: float = 0.0
    # model: a frozen copy of the starting Talker scores the reference log-probs (ZeRO-3-partitioned like the
    # policy); precomputed: the shards carry them (the on-policy pair builder records them).
    reference: str = "model"
    # The speaker a sample without one is spoken by (a key of the model's spk_dict.pt).
    speaker: str = "Chelsie"


@dataclass
class LoggingConfig:
    # wandb: offline unless the user opts in; the API key comes from the environment, never from config.
    wandb_mode: str = "offline"
    wandb_project: str = "omni-train"
    progress_bar: bool = True


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"
    # GPUs per node to request (0: none, e.g. a CPU cluster); nproc_per_node processes run on each node.
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    job_name: str = "omni-train"
    # Where sbatch writes each job's log (%x job name, %j job id); relative paths are under run_dir.
    output: str = "logs/%x-%j.out"
    # Extra `#SBATCH` lines, verbatim (e.g. "--exclusive", "--qos=high").
    extra: list[str] = field(default_factory=list)


@dataclass
class LauncherConfig:
    # local | torchrun | deepspeed | slurm (launch/cli.py)
    name: str = "none"
    # Processes per machine (GPUs per node on a cluster); `omni-launch` starts them, `omni-train` is one of them.
    nproc_per_node: int = 1
    nodes: int = 1
    # torchrun: this machine's index among the nodes (None: c10d assigns one on arrival).
    node_rank: Optional[int] = None
    # torchrun: this node's address as the others reach it (None: its host name), for a host whose name resolves
    # to the wrong network; c10d orders the nodes' ranks by it.
    local_addr: Optional[str] = None
    # torchrun's c10d rendezvous store (host:port of one node every node reaches) and the job's name in it.
    rdzv_endpoint: str = "127.0.0.1:29400"
    rdzv_id: str = "omni-train"
    # Elastic node range "min:max" (empty: exactly `nodes`).
    elastic: str = ""
    # Times torchrun restarts the workers after a failure; a restart resumes from the newest complete checkpoint.
    max_restarts: int = 0
    # DeepSpeed's launcher: its hostfile ("host slots=N" lines) and the first host's address and port.
    hostfile: Optional[str] = None
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Config:
    model: ModelConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    data: DataConfig = MISSING
    stage: StageConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    talker: TalkerConfig = field(default_factory=TalkerConfig)
    run_dir: str = "outputs/${stage.name}"
    # none: start fresh (refused if run_dir has checkpoints); auto: newest complete checkpoint in run_dir.
    resume: str = "none"


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(group="deepspeed", name="schema", node=DeepSpeedConfig)
    store.store(group="data", name="schema", node=DataConfig)
    store.store(group="stage", name="schema", node=StageConfig)
    store.store(group="launcher", name="schema", node=LauncherConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Semantic checks that types cannot express. Raises ConfigError naming the key and the fix."""
    from omni_train.model import DTYPES

    t, m, d, ds = cfg.trainer, cfg.model, cfg.data, cfg.deepspeed
    for key in ("max_steps", "micro_batch_size", "grad_accum", "save_every", "keep_last"):
        _check(getattr(t, key) > 0, f"trainer.{key}={getattr(t, key)} must be a positive integer")
    _check(t.lr > 0, f"trainer.lr={t.lr} must be positive")
    _check(0 <= t.min_lr_ratio <= 1, f"trainer.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1]")
    _check(0 <= t.warmup_steps < t.max_steps, f"trainer.warmup_steps={t.warmup_steps} must lie in [0, max_steps)")
    _check(t.grad_clip >= 0, f"trainer.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    _check(t.logits_chunk >= 0, f"trainer.logits_chunk={t.logits_chunk} must be >= 0 (0: no tiling)")
    _check(t.checkpointing in ("none", "selective", "full"),
           f"trainer.checkpointing={t.checkpointing} is not one of none, selective, full")
    _check(t.checkpoint_every >= 2 or t.checkpointing != "selective",
           f"trainer.checkpoint_every={t.checkpoint_every} must be >= 2 for selective checkpointing (1 is full)")
    _check(not t.offload_activations or t.checkpointing != "none",
           "trainer.offload_activations=true needs trainer.checkpointing=selective or full: only checkpointed "
           "activations are offloaded")
    _check(cfg.stage.objective in ("thinker", "talker_sft", "talker_dpo"),
           f"stage.objective={cfg.stage.objective} is not one of thinker, talker_sft, talker_dpo")
    if cfg.stage.objective != "thinker":
        _check(t.sequence_parallel == 1, f"trainer.sequence_parallel={t.sequence_parallel}: the Talker stages run "
               "without sequence parallelism (their sequences are short); set it to 1")
        _check(cfg.talker.beta > 0, f"talker.beta={cfg.talker.beta} must be positive")
        _check(cfg.talker.sft_weight >= 0, f"talker.sft_weight={cfg.talker.sft_weight} must be >= 0")
        _check(cfg.talker.reference in ("model", "precomputed"),
               f"talker.reference={cfg.talker.reference} is not one of model, precomputed")
    _check(t.mlp_chunk >= 0, f"trainer.mlp_chunk={t.mlp_chunk} must be >= 0 (0: no tiling)")
    _check(t.dist_timeout_min > 0, f"trainer.dist_timeout_min={t.dist_timeout_min} must be positive")
    _check(m.dtype in DTYPES, f"model.dtype={m.dtype} is not one of {sorted(DTYPES)}")
    _check(
        m.attn_implementation in ("sdpa", "flash_attention_2", "eager"),
        f"model.attn_implementation={m.attn_implementation} is not one of sdpa, flash_attention_2, eager",
    )
    if m.path is not None:
        _check(os.path.isdir(m.path), f"model.path={m.path} is not a directory: give a local checkpoint directory")
        _check(
            os.path.isfile(os.path.join(m.path, "config.json")) or os.path.isfile(os.path.join(m.path, "COMPLETE")),
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
    names = [s.name for s in d.sources]
    _check(len(set(names)) == len(names), f"data.sources names repeat: {names}")
    for s in d.sources:
        _check(os.path.exists(s.path) or any(c in s.path for c in "*?{:"),
               f"data source {s.name}: {s.path} does not exist: build it with `omni-prep build SOURCE {s.path}`")
        _check(s.weight > 0, f"data source {s.name}: weight={s.weight} must be positive")
    _check(d.chunk_samples > 0 and d.workers >= 0 and d.max_bad_samples >= 0,
           "data.chunk_samples must be positive; data.workers and data.max_bad_samples non-negative")
    _check(ds.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={ds.zero_stage} must be 0, 1, 2 or 3")
    for key in ("offload_optimizer", "offload_param"):
        _check(getattr(ds, key) in ("none", "cpu"), f"deepspeed.{key}={getattr(ds, key)} must be none or cpu")
    _check(
        ds.offload_param == "none" or ds.zero_stage == 3, "deepspeed.offload_param needs deepspeed.zero_stage=3"
    )
    _check(
        cfg.logging.wandb_mode in ("offline", "online", "disabled"),
        f"logging.wandb_mode={cfg.logging.wandb_mode} must be offline, online or disabled",
    )
    _check(
        cfg.resume in ("none", "auto") or os.path.isdir(cfg.resume),
        f"resume={cfg.resume} must be none, auto, or an existing checkpoint directory",
    )
    from omni_train.checkpoint import complete_checkpoints

    _check(
        cfg.resume != "none" or cfg.launcher.max_restarts > 0 or not complete_checkpoints(cfg.run_dir),
        f"run_dir={cfg.run_dir} already holds checkpoints: pass resume=auto to continue it, or choose another run_dir",
    )
    _check(cfg.launcher.nproc_per_node > 0, f"launcher.nproc_per_node={cfg.launcher.nproc_per_node} must be positive")
    _check(cfg.launcher.nodes > 0, f"launcher.nodes={cfg.launcher.nodes} must be positive")
    _check_launcher(cfg.launcher)
    _check(len(cfg.stage.trainable) > 0, "stage.trainable is empty: list the parameter patterns that train")
    _check_sequence_parallel(cfg, cfg.launcher.nproc_per_node * cfg.launcher.nodes)


def _check_launcher(la: LauncherConfig) -> None:
    _check(la.name in ("none", "local", "torchrun", "deepspeed", "slurm"),
           f"launcher={la.name} is not one of local, torchrun, deepspeed, slurm")
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
    from omni_train.attention import check_degree
    from omni_train.model import omni_config

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
    """Checks that need the real number of processes (known once the process group exists)."""
    _check_sequence_parallel(cfg, world)
