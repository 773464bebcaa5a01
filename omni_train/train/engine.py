"""The DeepSpeed engine: its config, which parameters train, optimizer, schedule, `deepspeed.initialize`.

Owns: composing the DeepSpeed JSON from the Hydra `deepspeed/` and `trainer` groups (no hand-kept JSON), freezing by
name pattern or module group, AdamW over the trainable parameters only (frozen ones get no optimizer state), linear
warmup + cosine decay, and wrapping the train module in a DeepSpeed engine.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from omni_train.config.schema import Config, Precision, effective_precision
from omni_train.errors import ConfigError
from omni_train.train.distributed import on_gpu


def precision(cfg: Config) -> Precision:
    """This rank's training precision: trainer.precision, `auto` resolved for the device it runs on."""
    return effective_precision(cfg, on_gpu())


def training_dtype(cfg: Config) -> torch.dtype:
    """The dtype the stage's models are built in (`precision`)."""
    from omni_train.model.build import DTYPES

    return DTYPES[precision(cfg)]


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for this run, from the `deepspeed` and `trainer` groups."""
    ds, t = cfg.deepspeed, cfg.trainer
    half = precision(cfg)
    zero: dict = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm, "contiguous_gradients": True,
                  "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            # Exports gather parameters themselves, module by module; no 16-bit copy at save time.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": on_gpu()}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": on_gpu()}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": half == Precision.bf16},
        "fp16": {"enabled": half == Precision.fp16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's own optimizer ops need compiled kernels; ours is torch's AdamW (ZeRO wraps it).
        "zero_allow_untested_optimizer": True,
    }
    _deep_merge(config, dict(ds.extra))
    return config


def _deep_merge(into: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


# Module groups `stage.trainable` may name instead of patterns.
GROUPS = {
    "llm": ["thinker.model.language_model.*", "thinker.lm_head.*"],
    "audio_encoder": ["thinker.model.audio_tower.*"],  # with its adapter
    "vision_encoder": ["thinker.model.visual.*"],  # with its adapter
    "audio_adapter": ["thinker.model.audio_tower.proj.*", "thinker.model.audio_tower.ln_post.*"],
    "vision_adapter": ["thinker.model.visual.merger.*"],
    "talker": ["talker.*"],  # the Talker stages' module (the DPO reference, `reference.*`, never trains)
}


def patterns(trainable: list[str]) -> list[str]:
    """`stage.trainable` with module groups (GROUPS) replaced by their patterns."""
    return [p for entry in trainable for p in GROUPS.get(entry, [entry])]


def check_patterns(names: list[str], trainable: list[str]) -> None:
    """A pattern that matches nothing is a configuration error: a typo would silently freeze the wrong thing."""
    unmatched = [p for p in trainable if not any(fnmatch.fnmatchcase(n, q) for q in patterns([p]) for n in names)]
    if unmatched:
        raise ConfigError(f"stage.trainable entries match no parameter: {unmatched} (names look like {names[0]!r}; "
                          f"groups: {', '.join(GROUPS)})")


def freeze(model: nn.Module, trainable: list[str]) -> None:
    """Train exactly the parameters whose names match one of the glob patterns or module groups."""
    check_patterns([n for n, _ in model.named_parameters()], trainable)
    globs = patterns(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in globs))


LORA_PARAMS = ["*.lora_A.*", "*.lora_B.*"]


def check_trainable(names: list[str], cfg: Config, default_targets: list[str]) -> None:
    """Before any process starts, on the stage module's parameter names: `stage.trainable`, or with LoRA its
    targets (against the modules that own a weight; the Linear check itself comes at build) and `train_fully`."""
    lora = cfg.stage.lora
    if not lora.enabled:
        check_patterns(names, list(cfg.stage.trainable))
        return
    from omni_train.model.lora import resolve

    resolve([n.removesuffix(".weight") for n in names if n.endswith(".weight")], list(lora.targets) or default_targets)
    if lora.train_fully:
        check_patterns(names, list(lora.train_fully))


def choose_trainable(module: nn.Module, cfg: Config, default_targets: list[str]) -> list[str]:
    """What trains in the stage's module: `stage.trainable`; or with `stage.lora.enabled` PEFT LoRA adapters
    injected on `stage.lora.targets` (default `default_targets`, the objective's) plus `stage.lora.train_fully`,
    every other weight frozen. Returns the adapted module names ([] without LoRA)."""
    lora = cfg.stage.lora
    if not lora.enabled:
        freeze(module, list(cfg.stage.trainable))
        return []
    from omni_train.model.lora import attach

    adapted = attach(module, list(lora.targets) or default_targets, lora.r, lora.alpha, lora.dropout,
                     cfg.trainer.seed)
    freeze(module, LORA_PARAMS + list(lora.train_fully))
    return adapted


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Norm gains and biases are not decayed: shrinking them changes scale, not capacity.
            (no_decay if p.ndim < 2 else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def initialize(cfg: Config, module: nn.Module, ds_config: dict):
    """Wrap `module` in a DeepSpeed engine with AdamW over its trainable parameters and the LR schedule (without
    DeepSpeed, `deepspeed=none`: omni_train.train.plain.PlainEngine; trained parameters of a 16-bit model, LoRA's
    adapters, are kept in fp32 there)."""
    import deepspeed

    t = cfg.trainer
    if not cfg.deepspeed.enabled:
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    groups = _param_groups(module, t.weight_decay)
    if not groups:
        raise ConfigError("no parameter trains: check stage.trainable")
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    )
    if not cfg.deepspeed.enabled:
        from omni_train.train.plain import PlainEngine

        return PlainEngine(module, optimizer, scheduler, t.grad_accum, t.grad_clip), optimizer, scheduler
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler
