"""LoRA on transformers' Qwen2.5-Omni classes, through Hugging Face PEFT.

Owns: which Linear modules of a stage's module get adapters (`stage.lora.targets`: patterns or groups, resolved to
exact module names), injecting PEFT's LoRA layers there (`peft.inject_adapter_in_model` with PEFT's own
`LoraConfig`, in place: parameter names keep the checkpoint's layout, `...q_proj.base_layer.weight` beside
`...q_proj.lora_A.default.weight`), running the model with the adapters switched off (the DPO reference: the base
model, no second copy of its weights), the merged weight of an adapted layer (PEFT's `get_delta_weight` on the
gathered weights, for the merged export), and the PEFT adapter directory's contents (`adapter_config.json` and the
keys of `adapter_model.safetensors` in the released checkpoint's module names).

Under ZeRO-3 the base weights are partitioned before the adapters exist; DeepSpeed's engine partitions the new
adapter parameters when it wraps the module. The adapters are created from a generator seeded by the run's seed,
so every rank (and every run with that seed) starts from the same ones.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import sys
from collections import defaultdict

import torch
from torch import nn

from omni_train.errors import ConfigError

ADAPTER = "default"  # PEFT's adapter name; saved files drop it, as PEFT's own save does

# Module groups `stage.lora.targets` may name: the attention and MLP projections of each stack.
TARGET_GROUPS = {
    "llm": ["thinker.model.language_model.layers.*.self_attn.[qkvo]_proj",
            "thinker.model.language_model.layers.*.mlp.*_proj"],
    "audio_encoder": ["thinker.model.audio_tower.layers.*.self_attn.*_proj", "thinker.model.audio_tower.layers.*.fc[12]"],
    "vision_encoder": ["thinker.model.visual.blocks.*.attn.[qkv]", "thinker.model.visual.blocks.*.attn.proj",
                       "thinker.model.visual.blocks.*.mlp.*_proj"],
    "talker": ["talker.model.layers.*.self_attn.[qkvo]_proj", "talker.model.layers.*.mlp.*_proj"],
}
# Read outside their own forward (the fused, tiled loss uses their weight directly): an adapter there would be
# skipped by the loss, so they train fully or not at all.
HEADS = ("lm_head", "codec_head")


def target_patterns(targets: list[str]) -> list[str]:
    return [p for entry in targets for p in TARGET_GROUPS.get(entry, [entry])]


def resolve(linear_names: list[str], targets: list[str]) -> list[str]:
    """The Linear modules (of `linear_names`, module names in the stage's module) that `targets` select; one
    ConfigError when an entry selects none or a head."""
    chosen, unmatched = [], []
    for entry in targets:
        hits = [n for n in linear_names if any(fnmatch.fnmatchcase(n, p) for p in target_patterns([entry]))]
        (chosen.extend(hits) if hits else unmatched.append(entry))
    if unmatched:
        raise ConfigError(f"stage.lora.targets entries select no Linear module: {unmatched} (names look like "
                          f"{linear_names[0]!r}; groups: {', '.join(TARGET_GROUPS)})")
    heads = sorted({n for n in chosen if n.rsplit(".", 1)[-1] in HEADS})
    if heads:
        raise ConfigError(f"stage.lora.targets selects {heads}: a head takes no adapter (the tiled loss reads its "
                          "weight directly); put it in stage.lora.train_fully instead")
    return sorted(set(chosen), key=linear_names.index)


def linear_names(module: nn.Module) -> list[str]:
    """The Linear modules of `module` as its base model has them (an adapted layer counts as the Linear it wraps;
    its own base layer and adapters do not)."""
    adapted = layers(module)
    inside = tuple(f"{name}." for name in adapted)
    return [n for n, m in module.named_modules()
            if n in adapted or (isinstance(m, nn.Linear) and not n.startswith(inside))]


def attach(module: nn.Module, targets: list[str], r: int, alpha: float, dropout: float, seed: int) -> list[str]:
    """Inject PEFT LoRA layers into `module` (in place) on the Linear modules `targets` selects; returns their
    names. Adapter weights: PEFT's initialisation (A Kaiming-uniform, B zero: the model is unchanged at step 0)
    drawn from a generator seeded by `seed`, the same on every rank."""
    from peft import LoraConfig, inject_adapter_in_model

    names = resolve(linear_names(module), targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    return names


def layers(module: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers of `module` by name (PEFT's LoRA wrappers)."""
    if "peft" not in sys.modules:
        return {}  # nothing was adapted in this process: spare the import
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def is_adapted(module: nn.Module) -> bool:
    return bool(layers(module))


@contextlib.contextmanager
def adapters_off(module: nn.Module):
    """Run `module` as its base model: every LoRA layer computes its base layer alone (the flag behind PEFT's
    `disable_adapters`). PEFT's own `enable_adapters(False)` would also flip the adapters' requires_grad, under
    the hooks DeepSpeed registered on them, in the middle of a step; this leaves them alone."""
    adapted = list(layers(module).values())
    for layer in adapted:
        if not hasattr(layer, "_disable_adapters"):
            raise RuntimeError("this PEFT's LoRA layers have no _disable_adapters flag: omni-train needs peft>=0.17")
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in adapted:
            layer._disable_adapters = False


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """An adapted layer's weight with its adapter merged in (W + scaling * B @ A, PEFT's own delta), in the base
    weight's dtype; its parameters must be whole (gathered under ZeRO-3)."""
    base = layer.get_base_layer().weight
    return (base.float() + layer.get_delta_weight(ADAPTER).float()).to(base.dtype)


def adapter_key(name: str) -> str:
    """A LoRA parameter's name as PEFT saves it: without the adapter name (`lora_A.default.weight` ->
    `lora_A.weight`)."""
    return name.replace(f".{ADAPTER}.", ".")


def peft_config(targets: list[str], universe: list[str], r: int, alpha: float, dropout: float,
                modules_to_save: list[str], base: str | None):
    """PEFT's LoraConfig for the adapter directory. `targets` are module names of the class the adapter is for, as
    transformers names them in memory (PEFT matches them there when it loads), `universe` all its Linear modules;
    written as one regex, a stack's layer indices collapsed to \\d+ when every layer of the stack is targeted."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(targets, universe),
                      bias="none", modules_to_save=modules_to_save or None, base_model_name_or_path=base)


def target_regex(names: list[str], universe: list[str]) -> str:
    """A regex that fully matches exactly `names` among `universe` (PEFT matches target_modules with re.fullmatch)."""

    def split(name: str) -> tuple[str, str | None]:
        index = re.search(r"\.(\d+)\.", name)
        return (name[:index.start()] + ".#." + name[index.end():], index.group(1)) if index else (name, None)

    every: dict[str, set[str]] = defaultdict(set)
    for name in universe:
        shape, index = split(name)
        every[shape].add(index)
    chosen: dict[str, set[str]] = defaultdict(set)
    for name in names:
        shape, index = split(name)
        chosen[shape].add(index)
    parts = []
    for shape, indices in chosen.items():
        if indices == {None}:
            parts.append(re.escape(shape))
            continue
        head, tail = (re.escape(x) for x in shape.split(".#.", 1))
        index_re = r"\d+" if indices == every[shape] else f"(?:{'|'.join(sorted(indices, key=int))})"
        parts.append(f"{head}\\.{index_re}\\.{tail}")
    return "|".join(parts)
