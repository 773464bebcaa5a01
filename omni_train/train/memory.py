"""The per-GPU memory a training configuration needs, before anything runs (`omni-train plan` prints it).

Owns: the memory model below, computed from the composed config (model preset, stage, nodes x processes, micro
batch, row length, sequence parallelism, ZeRO offload, activation checkpointing, loss tiling) on a meta-device
Thinker, and the start-of-training check that warns when it will not fit the GPU.

Per GPU, with W = launcher.nodes x launcher.nproc_per_node ranks, N parameters of the stage's module (the Thinker;
for the Talker stages also the Talker and, for talker_dpo with a reference copy, that copy; with stage.lora also
the adapters), N_t of them trained (stage.trainable; with LoRA the adapters and stage.lora.train_fully), p bytes per
parameter element (2 for bf16/fp16, 4 for fp32: trainer.precision, `auto` taken as on GPUs; with LoRA, bf16 keeps
the frozen base in bf16),
T = micro_batch_size x max_len / sequence_parallel tokens:
- parameters: N x p / W (ZeRO-3 partitions them; 0 with offload_param=cpu);
- optimizer and gradients: N_t x 16 / W with 16-bit weights (fp32 master, Adam m and v, fp32 gradient partition),
  N_t x 12 / W in fp32 (m, v, gradient); 0 with offload_optimizer=cpu. With the parameters this is DeepSpeed's own
  estimate (`estimate_zero3_model_states_mem_needs`: 18 bytes per parameter in bf16), which a test checks;
- gathered working set: the largest module's parameters twice (the one computing and the one prefetched);
- activations of the model that backpropagates (the Thinker's language model; the Talker in the Talker stages,
  whose Thinker runs without gradient): per token and layer p x (5h + 2kv + 3I) bytes kept for the backward (the
  inputs of the norms, projections, attention and MLP: h hidden, kv key/value width, I MLP width; the 3I part not
  kept with `trainer.mlp_chunk`); a checkpointed layer keeps p x h instead (in host memory with
  `offload_activations`), plus one layer's worth while it is recomputed; `selective` checkpoints every
  `checkpoint_every`-th layer, `full` all; attention itself is flash/per-sample (no L x L);
- the largest MLP intermediate: 3 x I x p bytes per token of one layer at once (a tile's with `mlp_chunk`);
- logits: fp32 logits, their softmax and gradient, 12 x V bytes per labelled token (V: the text or codec
  vocabulary) at once: all of a rank's
  tokens on the plain path (the worst case: every token labelled), `trainer.logits_chunk` with tiling;
The encoders' activations are not modelled (they depend on the media mix); leave headroom for them.
"""

from __future__ import annotations

import math

import torch

from omni_train.config.schema import Config, effective_precision

GIB = 2**30


def _meta_module(cfg: Config):
    """What the stage's module holds, on the meta device, named as in training: the Thinker (`thinker.`); for the
    Talker stages the Talker (`talker.`) and, for talker_dpo with talker.reference=model and no LoRA, the frozen
    reference copy (`reference.`); with stage.lora, the adapters injected as training injects them."""
    from torch import nn
    from transformers import Qwen2_5OmniTalkerForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    from omni_train.config.schema import Objective, Reference
    from omni_train.model.build import omni_config

    config = omni_config(cfg.model)
    talker_stage = cfg.stage.objective != Objective.thinker
    lora = cfg.stage.lora
    module = nn.Module()
    with torch.device("meta"):
        module.thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)
        if talker_stage:
            module.talker = Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config)
            if (cfg.stage.objective == Objective.talker_dpo and cfg.talker.reference == Reference.model
                    and not lora.enabled):
                module.reference = Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config)
        if lora.enabled:
            from omni_train.model.lora import attach

            from omni_train.train.recipes import recipe

            attach(module, list(lora.targets) or recipe(cfg.stage.objective).lora_targets, lora.r, lora.alpha,
                   lora.dropout, cfg.trainer.seed)
    return module


def _trainable(cfg: Config, names: list[str]) -> set[str]:
    import fnmatch

    from omni_train.train.engine import LORA_PARAMS, patterns

    lora = cfg.stage.lora
    globs = patterns(LORA_PARAMS + list(lora.train_fully) if lora.enabled else list(cfg.stage.trainable))
    return {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)
            and (cfg.stage.objective == "thinker" or n.startswith("talker."))}


def model_states(total: int, trainable: int, largest: int, world: int, element: int, offload_param: bool,
                 offload_optimizer: bool) -> dict[str, float]:
    """Bytes per GPU of the ZeRO-3 model states (see the module docstring)."""
    per_trainable = 16 if element == 2 else 12
    return {
        "parameters (ZeRO-3 shard)": 0.0 if offload_param else total * element / world,
        "optimizer + gradients (shard)": 0.0 if offload_optimizer else trainable * per_trainable / world,
        "gathered working set": 2.0 * largest * element,
    }


def estimate(cfg: Config) -> dict[str, float]:
    """Bytes per GPU for each line of the plan."""
    from omni_train.model.build import DTYPES

    module = _meta_module(cfg)
    params = dict(module.named_parameters())
    trained = _trainable(cfg, list(params))
    total = sum(p.numel() for p in params.values())
    trainable = sum(params[n].numel() for n in trained)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())
    # Activations and logits: of the model that backpropagates (the Thinker's language model, or the Talker, whose
    # Thinker runs without gradient)
    talker = getattr(module, "talker", None)
    text = talker.config if talker is not None else module.thinker.config.text_config
    world = cfg.launcher.nodes * cfg.launcher.nproc_per_node
    element = DTYPES[effective_precision(cfg, gpu=True)].itemsize
    ds = cfg.deepspeed
    lines = model_states(total, trainable, largest, world, element, ds.offload_param != "none",
                         ds.offload_optimizer != "none")
    t = cfg.trainer
    tokens = t.micro_batch_size * cfg.data.max_len / t.sequence_parallel
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    kv = text.num_key_value_heads * (getattr(text, "head_dim", None) or h // text.num_attention_heads)
    mlp = element * 3 * inter  # per token: gate and up projections, their product
    kept = element * (5 * h + 2 * kv) + (0 if t.mlp_chunk else mlp)  # per token and layer, for the backward
    ckpt = {"none": 0, "full": layers, "selective": math.ceil(layers / t.checkpoint_every)}[t.checkpointing]
    acts = tokens * kept * (layers - ckpt + (1 if ckpt else 0))  # recomputing one checkpointed layer at a time
    if not t.offload_activations:  # the checkpointed layers' inputs, else in host memory
        acts += tokens * element * h * ckpt
    lines["activations (language model)" if talker is None else "activations (Talker)"] = acts
    lines["largest MLP intermediate"] = (min(tokens, t.mlp_chunk) if t.mlp_chunk else tokens) * mlp
    labelled = min(tokens, t.logits_chunk) if t.logits_chunk > 0 else tokens
    vocab = talker.config.vocab_size if talker is not None else text.vocab_size
    lines["logits (fp32, with softmax and gradient)"] = 12.0 * labelled * vocab
    return lines


def report(cfg: Config, gpu_gb: float) -> tuple[str, bool]:
    lines = estimate(cfg)
    total = sum(lines.values())
    world, t = cfg.launcher.nodes * cfg.launcher.nproc_per_node, cfg.trainer
    head = (f"memory plan per GPU: model={cfg.model.preset} stage={cfg.stage.name} {cfg.launcher.nodes} node(s) x "
            f"{cfg.launcher.nproc_per_node} = {world} ranks, micro batch {cfg.trainer.micro_batch_size} x "
            f"{cfg.data.max_len} tokens, sequence parallel {cfg.trainer.sequence_parallel}, "
            f"{effective_precision(cfg, gpu=True)}, checkpointing {t.checkpointing}{' (offloaded)' if t.offload_activations else ''}, "
            f"logits_chunk {t.logits_chunk}, mlp_chunk {t.mlp_chunk}")
    body = [f"  {name:<42} {value / GIB:8.2f} GiB" for name, value in lines.items()]
    fits = total <= gpu_gb * GIB
    tail = (f"  {'total (encoders not counted)':<42} {total / GIB:8.2f} GiB: "
            f"{'fits' if fits else 'does NOT fit'} in {gpu_gb:g} GiB")
    return "\n".join([head, *body, tail]), fits


def warn_if_too_big(cfg: Config, warn) -> None:
    """At the start of training on a GPU: warn (never stop) when the plan exceeds the device's memory."""
    if not torch.cuda.is_available():
        return
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    text, fits = report(cfg, gpu_gb)
    if not fits:
        warn(f"this configuration may not fit the GPU ({gpu_gb:.0f} GiB):\n{text}")
