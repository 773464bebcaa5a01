"""The Qwen2.5-Omni model, built from transformers' own classes.

Owns: turning a model preset (conf/model/*.yaml) or a local checkpoint directory into a transformers
`Qwen2_5OmniConfig`; instantiating the Thinker (and, for Talker stages, the Talker) partitioned from the start
under DeepSpeed ZeRO-3 (`deepspeed.zero.Init`, via transformers' own `HfDeepSpeedConfig` hook, so a 7B model
never materialises whole on one rank); and streaming checkpoint weights into the partitioned parameters.

Checkpoint layouts accepted by `model.path`:
- the released Qwen2.5-Omni layout (config `model_type: qwen2_5_omni`, weights under `thinker.` / `talker.` /
  `token2wav.`), and
- a Thinker-only export of this framework (config `model_type: qwen2_5_omni_thinker`, no prefix).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_train.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_checkpoint_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.path={path} has no config.json: point it at a Hugging Face checkpoint directory")
    return json.loads(config_file.read_text())


def omni_config(cfg: ModelConfig):
    """The full `Qwen2_5OmniConfig` (Thinker, Talker, Token2Wav) for a preset or a checkpoint directory."""
    from transformers import Qwen2_5OmniConfig

    raw = _read_checkpoint_config(Path(cfg.path)) if cfg.path is not None else None
    # transformers warns that the Talker config holds token ids beyond the codec vocabulary: they are Thinker ids
    # (tts_text_*, vision/audio bos), by design; silence that one false alarm.
    with _transformers_log_level(logging.ERROR):
        if raw is None:
            return Qwen2_5OmniConfig(**_plain(cfg.hf_config))
        if raw.get("model_type") == "qwen2_5_omni":
            return Qwen2_5OmniConfig.from_pretrained(cfg.path)
        if raw.get("model_type") == "qwen2_5_omni_thinker":
            # A Thinker export: keep the preset's Talker and Token2Wav, take the Thinker from the checkpoint.
            return Qwen2_5OmniConfig(**{**_plain(cfg.hf_config), "thinker_config": raw})
    raise ConfigError(
        f"model.path={cfg.path} holds a '{raw.get('model_type')}' checkpoint; expected a Qwen2.5-Omni "
        "('qwen2_5_omni') or Qwen2.5-Omni Thinker ('qwen2_5_omni_thinker') checkpoint"
    )


@contextlib.contextmanager
def _transformers_log_level(level: int):
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(level)
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _plain(node: Any) -> Any:
    """OmegaConf containers to plain dicts and lists (transformers' configs do not accept DictConfig)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core, a hard dependency
        pass
    return node


def thinker_parameter_names(cfg: ModelConfig) -> list[str]:
    """Parameter names of the Thinker as the train module sees them (`thinker.` prefix), without weights:
    the model is built on the meta device, so this is cheap even for the 7B."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration(omni_config(cfg).thinker_config)
    return [f"thinker.{n}" for n, _ in model.named_parameters()]


def thinker_prefix(path: str | None) -> str:
    """Key prefix of the Thinker's weights inside the checkpoint at `path`."""
    if path is None:
        return ""
    return "thinker." if _read_checkpoint_config(Path(path)).get("model_type") == "qwen2_5_omni" else ""


def build_thinker(cfg: ModelConfig, ds_config: dict | None):
    """Instantiate the Thinker, partitioned under ZeRO-3 when `ds_config` enables stage 3, with weights
    from `cfg.path` when given (random init from the preset otherwise)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration
    from transformers.integrations import HfDeepSpeedConfig

    config = omni_config(cfg).thinker_config
    # transformers 5.24's get_rope_index reads these, but the Thinker config does not define them.
    config.vision_start_token_id = 151652
    config.vision_end_token_id = 151653
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    # transformers only partitions at construction while an HfDeepSpeedConfig object is alive.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None
    model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(
        config, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation
    )
    if cfg.path is not None:
        load_weights(model, Path(cfg.path), prefix=thinker_prefix(cfg.path))
    model._omni_hf_ds_config = hf_ds  # keep the hook alive as long as the model
    return model


def _safetensors_index(path: Path) -> dict[str, Path]:
    """Checkpoint key -> file holding it (sharded or single-file safetensors)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise ConfigError(f"model.path={path} has no model.safetensors(.index.json): only safetensors checkpoints load")


def load_weights(model: nn.Module, path: Path, prefix: str = "", strict: bool = True) -> None:
    """Copy `prefix`-ed tensors of the safetensors checkpoint at `path` into `model`, one module at a time.

    Under ZeRO-3 each module's parameters are gathered, rank 0 fills them from disk, and leaving the context
    re-partitions them; nothing larger than one module is ever whole on a rank.
    """
    import deepspeed
    from safetensors import safe_open

    key_file = {k[len(prefix) :]: f for k, f in _safetensors_index(path).items() if k.startswith(prefix)}
    own = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    missing = sorted(n for n in own if n not in key_file and not _is_non_persistent(model, n))
    unexpected = sorted(k for k in key_file if k not in own)
    if strict and (missing or unexpected):
        raise ConfigError(
            f"checkpoint {path} does not match the model: missing {missing[:20]}{'...' if len(missing) > 20 else ''}, "
            f"unexpected {unexpected[:20]}{'...' if len(unexpected) > 20 else ''}"
        )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    handles: dict[Path, Any] = {}

    def tensor(name: str) -> torch.Tensor:
        file = key_file[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file].get_tensor(prefix + name)

    with torch.no_grad():
        for module_name, module in model.named_modules():
            scope = f"{module_name}." if module_name else ""
            params = {scope + n: p for n, p in module.named_parameters(recurse=False)}
            buffers = {scope + n: b for n, b in module.named_buffers(recurse=False)}
            params = {n: p for n, p in params.items() if n in key_file}
            buffers = {n: b for n, b in buffers.items() if n in key_file}
            if not params and not buffers:
                continue
            partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0, enabled=bool(partitioned)):
                if rank == 0 or not partitioned:
                    for name, p in params.items():
                        p.data.copy_(tensor(name).to(p.dtype))
            for name, b in buffers.items():
                b.copy_(tensor(name).to(b.dtype))


def _is_non_persistent(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf in getattr(module, "_non_persistent_buffers_set", set())


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable and this rank's locally held (ZeRO-3 partition) parameter counts."""
    counts = defaultdict(int)
    for p in model.parameters():
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        counts["total"] += full
        counts["trainable"] += full if p.requires_grad else 0
        counts["local"] += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return dict(counts)
