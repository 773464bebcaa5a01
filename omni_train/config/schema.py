"""Structured configuration: the schema behind every Hydra config group.

Owns: one dataclass per config group (`model/`, `deepspeed/`, `trainer`, `data/`, `stage/`, `logging`, `launcher`,
`talker`), registered with Hydra's ConfigStore, and one Enum per closed set of values, so that an unknown key, a
wrongly typed value or a value outside its set fails at composition with OmegaConf's one line. What types cannot
say (ranges, paths, divisibility) is checked by omni_train.config.validate.

A leaf: imports nothing of the project but the base's SlurmConfig (omni_train/slurm.py; Hydra and OmegaConf
otherwise), so every layer may read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from omni_train.slurm import SlurmConfig


class Objective(StrEnum):
    """What a stage trains (omni_train/train/recipes): next-token LM on the Thinker, next codec token on the frozen
    Thinker's states, or DPO on speech preference triplets."""

    thinker = "thinker"
    talker_sft = "talker_sft"
    talker_dpo = "talker_dpo"


class Checkpointing(StrEnum):
    """Activation checkpointing (omni_train/model/kernels/activations.py)."""

    none = "none"
    selective = "selective"
    full = "full"


class Reference(StrEnum):
    """Where talker_dpo's reference log-probs come from."""

    model = "model"
    precomputed = "precomputed"


class Precision(StrEnum):
    """The training precision (trainer.precision); `auto` is resolved on the ranks (`effective_precision`)."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Attention(StrEnum):
    """transformers' attention implementation for the model (sdpa: our per-sample packed core on the LLM, our
    per-chunk/window attention on the encoders)."""

    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"
    eager = "eager"


class Offload(StrEnum):
    none = "none"
    cpu = "cpu"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Launcher(StrEnum):
    """How `omni-launch` starts the processes (launch/cli.py); none: `omni-train` was started directly."""

    none = "none"
    local = "local"
    torchrun = "torchrun"
    deepspeed = "deepspeed"
    slurm = "slurm"


@dataclass
class ComposeConfig:
    # Local checkpoint directories (Hugging Face layout): a Qwen2.5 LLM (Qwen2ForCausalLM), a Whisper model
    # (WhisperModel or WhisperForConditionalGeneration; its encoder is used) and Qwen2.5-VL (its vision tower).
    # All three or none.
    llm: Optional[str] = None
    # The Whisper checkpoint directory (see llm).
    audio: Optional[str] = None
    # The Qwen2.5-VL checkpoint directory (see llm).
    vision: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return any((self.llm, self.audio, self.vision))


@dataclass
class ModelConfig:
    # The preset's name (conf/model/NAME.yaml): the architecture's shapes in hf_config.
    preset: str = MISSING
    # A local Hugging Face checkpoint directory; None initialises the preset randomly (or composes, below).
    path: Optional[str] = None
    # Stage-1 initialisation by composition (omni_train/model/keymap.py lists the key mapping); exclusive with `path`.
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    # transformers' attention kernel; sdpa runs omni-train's packed per-sample core on the LLM (no L x L mask) and
    # its encoder attention (one call per layer over all audio chunks or vision windows) on the encoders;
    # flash_attention_2 needs the flash-attn package and a CUDA GPU.
    attn_implementation: Attention = Attention.sdpa
    # Keyword arguments of transformers' Qwen2_5OmniConfig (thinker_config, talker_config, token2wav_config).
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeepSpeedConfig:
    # The option's name (set by its yaml).
    name: str = MISSING
    # False (deepspeed=none): one process without DeepSpeed, plain torch AdamW (omni_train/train/plain.py): the
    # single-GPU path, e.g. LoRA of the 7B on one card.
    enabled: bool = True
    # ZeRO stage: 3 partitions parameters, gradients and optimizer state over the data-parallel ranks.
    zero_stage: int = 3
    # Keep the optimizer state (and its step) in CPU memory.
    offload_optimizer: Offload = Offload.none
    # Keep the partitioned parameters in CPU memory (needs zero_stage=3).
    offload_param: Offload = Offload.none
    # Overlap the gradient reduction with the backward pass (DeepSpeed's overlap_comm).
    overlap_comm: bool = False
    # Elements per gradient reduce-scatter bucket.
    reduce_bucket_size: int = 50_000_000
    # Elements of parameters ZeRO-3 gathers ahead of their use.
    stage3_prefetch_bucket_size: int = 50_000_000
    # Parameters smaller than this many elements stay whole on every rank (not partitioned).
    stage3_param_persistence_threshold: int = 100_000
    # Merged verbatim into the generated DeepSpeed JSON, for settings this schema does not name.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    # Optimizer steps of the run (the LR schedule's length).
    max_steps: int = 30
    # Packed rows per rank per micro-batch.
    micro_batch_size: int = 2
    # Micro-batches per optimizer step (gradient accumulation).
    grad_accum: int = 1
    # Peak learning rate (AdamW), reached after warmup_steps and decayed by a cosine to lr x min_lr_ratio.
    lr: float = 1e-3
    # The cosine's floor as a fraction of lr.
    min_lr_ratio: float = 0.1
    # Steps of linear warm-up to lr.
    warmup_steps: int = 3
    # AdamW's decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW's first-moment decay.
    beta1: float = 0.9
    # AdamW's second-moment decay.
    beta2: float = 0.95
    # AdamW's epsilon.
    eps: float = 1e-8
    # Clip the global gradient norm to this (0: no clipping).
    grad_clip: float = 1.0
    # Seeds the data order and shuffle windows, and the random initialisations (a preset without model.path, LoRA's
    # adapters).
    seed: int = 1234
    # Steps between checkpoints in RUN_DIR/checkpoints; the last step is always saved.
    save_every: int = 10
    # Newest checkpoints kept (older ones are deleted once a newer one is complete).
    keep_last: int = 2
    # Write RUN_DIR/export (a transformers checkpoint; with LoRA the merged model, and RUN_DIR/adapter) at the end.
    export: bool = True
    # Minutes a collective may wait for a peer during training steps before the job stops (torch's default is 30).
    dist_timeout_min: float = 10.0
    # Minutes a collective may wait while ranks do unequal work: start-up (model build, rank 0 consolidating a
    # DeepSpeed checkpoint), the first step, checkpoint saves and the export (rank 0 writes, the others wait).
    startup_timeout_min: float = 60.0
    # Ranks that share one packed row, each holding 1/N of its tokens (Ulysses; 1 = off). It must divide the
    # world size and data.pad_to_multiple_of, and split the attention heads (see omni_train/model/kernels/attention.py).
    sequence_parallel: int = 1
    # Labelled tokens per tile of the fused LM head + cross-entropy (omni_train/model/kernels/head_loss.py); 0 forms all their
    # logits at once (the plain path); the Talker's codec head likewise. Same loss and gradients either way. A tile
    # holds ~12 x 152k bytes per token at its peak (1024: 1.7 GiB).
    logits_chunk: int = 1024
    # Activation checkpointing (omni_train/model/kernels/activations.py): none | selective (every `checkpoint_every`-th layer) |
    # full (every layer); `offload_activations` keeps the checkpointed inputs in host memory.
    checkpointing: Checkpointing = Checkpointing.none
    # With checkpointing=selective: every N-th layer is checkpointed.
    checkpoint_every: int = 2
    # Keep the checkpointed layer inputs in host memory (CPU) until the backward pass.
    offload_activations: bool = False
    # Tokens per tile of the language model's MLPs (DeepSpeed's TiledMLP); 0 runs them whole.
    mlp_chunk: int = 0
    # Steps between evaluations on eval.sources (0: none). With evaluations, the model is also evaluated before
    # its first step and after its last (omni_train/train/evaluate.py).
    eval_every: int = 0
    # Keep the checkpoint with the best eval/loss beside the keep_last newest: every evaluation that improves on
    # the best saves a checkpoint; RUN_DIR/checkpoints/best.json names it. Needs eval_every.
    keep_best: bool = False
    # A step whose loss or gradient norm is not finite (on any rank) is skipped on every rank: no change to the
    # weights, the optimizer or the LR schedule. After this many such steps in a row the run stops (exit code 4).
    max_nonfinite_steps: int = 3
    # The parameters' and activations' precision: bf16 | fp16 (under DeepSpeed with its fp32 master weights and
    # optimizer state; deepspeed=none keeps LoRA's adapters in fp32 and refuses a 16-bit full fine-tune) | fp32 |
    # auto: bf16 where the ranks run on CUDA GPUs and either DeepSpeed or LoRA keeps the trained weights in fp32,
    # else fp32 (CPU ranks; deepspeed=none training every weight). The run saves the precision it resolved, and a
    # resume keeps it. The losses accumulate in fp32 whatever the precision.
    precision: Precision = Precision.auto


@dataclass
class SourceConfig:
    # The source's name: its share of the mixture is logged under it.
    name: str = MISSING
    # Shards made by `omni-prep build`: its output directory, a glob, a brace list or URLs webdataset opens.
    path: str = MISSING
    # Mixing weight; the realised mixture is logged.
    weight: float = 1.0


@dataclass
class DataConfig:
    # The option's name (set by its yaml).
    name: str = MISSING
    # The training shard sets: a list of {name, path, weight} (omni-prep build outputs).
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
class EvalConfig:
    # Held-out shard sets (omni-prep build outputs), named like data.sources (weights unused): each evaluated whole
    # at every evaluation, every sample once across ranks, in shard order, packed into rows of data.max_len.
    sources: list[SourceConfig] = field(default_factory=list)
    # Micro-batches per rank and source at most (0: every sample). With a cap, which samples are evaluated depends
    # on the number of ranks.
    max_batches: int = 0
    # Decoding worker processes for evaluation (0: decode in the training process).
    workers: int = 0


@dataclass
class LoraConfig:
    """Low-rank adapters (Hugging Face PEFT's LoRA) instead of full fine-tuning (omni_train/model/lora.py). With
    `enabled`, the adapters on `targets` and the parameters `train_fully` names train, and every other weight stays
    frozen: `stage.trainable` is not used."""

    # Train low-rank adapters instead of the weights.
    enabled: bool = False
    # The adapters' rank.
    r: int = 16
    # LoRA's scaling numerator: the update is (alpha / r) B A.
    alpha: float = 32.0
    # Dropout on the adapters' input.
    dropout: float = 0.05
    # Linear modules that get adapters: glob patterns of module names in the stage's module (as in stage.trainable,
    # e.g. "thinker.model.language_model.layers.*.self_attn.q_proj") or groups: llm, audio_encoder, vision_encoder,
    # talker (their attention and MLP projections). Empty: the objective's default (llm for thinker stages, talker
    # for the Talker stages). The heads (lm_head, codec_head) cannot take adapters: train them fully instead.
    targets: list[str] = field(default_factory=list)
    # Parameters trained fully beside the adapters: patterns or stage.trainable's groups (e.g. [audio_adapter,
    # vision_adapter], or ["talker.codec_head.*"]); exported as PEFT's modules_to_save.
    train_fully: list[str] = field(default_factory=list)


@dataclass
class StageConfig:
    # The stage's name (its yaml); run_dir defaults to outputs/NAME.
    name: str = MISSING
    # Glob-style patterns of parameter names that train, or module groups (llm, audio_encoder, vision_encoder,
    # audio_adapter, vision_adapter; omni_train/train/engine.py GROUPS); everything else is frozen. ["*"] trains all.
    trainable: list[str] = field(default_factory=lambda: ["*"])
    # What trains: thinker (next-token LM), talker_sft (next codec token on the frozen Thinker's states) or
    # talker_dpo (DPO on speech preference triplets); one recipe each in omni_train/train/recipes.
    objective: Objective = Objective.thinker
    # LoRA instead of full fine-tuning (off by default).
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TalkerConfig:
    # DPO temperature (the paper does not disclose its value; TRL's default).
    beta: float = 0.1
    # Weight of the chosen sequence's mean codec cross-entropy added to each triplet's DPO loss (0: pure DPO).
    sft_weight: float = 0.0
    # model: a frozen copy of the starting Talker scores the reference log-probs (ZeRO-3-partitioned like the
    # policy); precomputed: the shards carry them (the on-policy pair builder records them).
    reference: Reference = Reference.model
    # The speaker a sample without one is spoken by (a key of the model's spk_dict.pt).
    speaker: str = "Chelsie"


@dataclass
class LoggingConfig:
    # wandb: offline unless the user opts in; the API key comes from the environment, never from config.
    wandb_mode: WandbMode = WandbMode.offline
    # The wandb project runs are logged under.
    wandb_project: str = "omni-train"
    # A progress bar on rank 0's console (tqdm); off in logs and tests.
    progress_bar: bool = True
    # The step metrics and evaluations also as TensorBoard scalars in run_dir/tensorboard (needs the tensorboard
    # package: pip install 'omni-train[tensorboard]').
    tensorboard: bool = False


@dataclass
class LauncherConfig:
    # The option's name (set by its yaml): local, torchrun, deepspeed or slurm; none when omni-train runs alone.
    name: Launcher = Launcher.none
    # Processes per machine (GPUs per node on a cluster); `omni-launch` starts them, `omni-train` is one of them.
    nproc_per_node: int = 1
    # Machines in the job.
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
    # DeepSpeed's launcher: its hostfile ("host slots=N" lines) and the first host's address and port. Without
    # master_addr, DeepSpeed asks the first host for its address over ssh; with launcher.node_rank (no ssh) on more
    # than one node it must be given.
    hostfile: Optional[str] = None
    master_addr: Optional[str] = None
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Where the run writes (config.yaml, metrics.jsonl, checkpoints/, export/, summary.json).
    run_dir: str = "outputs/${stage.name}"
    # none: start fresh (refused if run_dir has checkpoints); auto: newest complete checkpoint in run_dir.
    resume: str = "none"


def effective_precision(cfg: Config, gpu: bool) -> Precision:
    """trainer.precision with `auto` resolved for ranks on CUDA GPUs (`gpu`) or on CPUs: bf16 on GPUs when fp32
    copies of the trained weights exist (DeepSpeed's master weights, or LoRA's fp32 adapters without DeepSpeed),
    fp32 otherwise (CPU ranks; plain AdamW on every weight of a 16-bit model would round its updates away)."""
    chosen = Precision(cfg.trainer.precision)
    if chosen != Precision.auto:
        return chosen
    return Precision.bf16 if gpu and (cfg.deepspeed.enabled or cfg.stage.lora.enabled) else Precision.fp32


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(group="deepspeed", name="schema", node=DeepSpeedConfig)
    store.store(group="data", name="schema", node=DataConfig)
    store.store(group="stage", name="schema", node=StageConfig)
    store.store(group="launcher", name="schema", node=LauncherConfig)
