"""The Qwen2.5-Omni model, built from transformers' own classes.

Owns: turning a model preset (conf/model/*.yaml) or a local checkpoint directory into a transformers
`Qwen2_5OmniConfig`; instantiating the Thinker (and, for Talker stages, the Talker) partitioned from the start
under DeepSpeed ZeRO-3 (`deepspeed.zero.Init`, via transformers' own `HfDeepSpeedConfig` hook, so a 7B model
never materialises whole on one rank); and streaming checkpoint weights into the partitioned parameters.

Checkpoint layouts accepted by `model.path`:
- the released Qwen2.5-Omni layout (config `model_type: qwen2_5_omni`, weights under `thinker.` / `talker.` /
  `token2wav.`), and
- a Thinker-only checkpoint (config `model_type: qwen2_5_omni_thinker`): this framework's exports, or a Thinker
  saved by transformers.
`model.compose` instead builds the Thinker from a Qwen2.5 LLM, a Whisper encoder and a Qwen2.5-VL vision tower (the
paper's stage-1 initialisation). The key mappings of both are written down in omni_train/model/keymap.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omni_train import dist
from omni_train.config.schema import ModelConfig, Precision
from omni_train.errors import ConfigError
from omni_train.files import is_complete
from omni_train.model import keymap
from omni_train.model.keymap import Source
from omni_train.progress import Progress
from omni_train.tokens import VISION_BOS, VISION_EOS

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


def _read_checkpoint_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.path={path} has no config.json: point it at a Hugging Face checkpoint directory")
    return json.loads(config_file.read_text())


def omni_config(cfg: ModelConfig):
    """The full `Qwen2_5OmniConfig` (Thinker, Talker, Token2Wav) for a preset or a checkpoint directory."""
    from transformers import Qwen2_5OmniConfig

    raw = _read_checkpoint_config(Path(cfg.path)) if cfg.path is not None and not is_deepspeed_checkpoint(cfg.path) \
        else None
    # transformers warns that the Talker config holds token ids beyond the codec vocabulary: they are Thinker ids
    # (tts_text_*, vision/audio bos), by design; silence that one false alarm.
    with _transformers_log_level(logging.ERROR):
        if raw is None:
            return _with_vision_ids(Qwen2_5OmniConfig(**_plain(cfg.hf_config)))
        if raw.get("model_type") == "qwen2_5_omni":
            return _with_vision_ids(Qwen2_5OmniConfig.from_pretrained(cfg.path))
        if raw.get("model_type") == "qwen2_5_omni_thinker":
            # A Thinker export: keep the preset's Talker and Token2Wav, take the Thinker from the checkpoint.
            return _with_vision_ids(Qwen2_5OmniConfig(**{**_plain(cfg.hf_config), "thinker_config": raw}))
    raise ConfigError(
        f"model.path={cfg.path} holds a '{raw.get('model_type')}' checkpoint; expected a Qwen2.5-Omni "
        "('qwen2_5_omni') or Qwen2.5-Omni Thinker ('qwen2_5_omni_thinker') checkpoint"
    )


def _with_vision_ids(config):
    """transformers 5.24's get_rope_index reads these from the Thinker config, which does not define them."""
    config.thinker_config.vision_start_token_id = VISION_BOS
    config.thinker_config.vision_end_token_id = VISION_EOS
    return config


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


def parameter_names(cfg: ModelConfig, talker: bool = False) -> list[str]:
    """Parameter names of the Thinker as the train module sees them (`thinker.` prefix), and with `talker` the
    Talker's (`talker.`), without weights: built on the meta device, so this is cheap even for the 7B."""
    from transformers import (
        Qwen2_5OmniTalkerForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    config = omni_config(cfg)
    with torch.device("meta"), _transformers_log_level(logging.ERROR):
        parts = {"thinker": Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)}
        if talker:
            parts["talker"] = Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config)
    return [f"{prefix}.{n}" for prefix, model in parts.items() for n, _ in model.named_parameters()]


def _zero3_hook(ds_config: dict | None):
    """transformers partitions a model at construction only while an HfDeepSpeedConfig object is alive: one for a
    ZeRO-3 config (the caller keeps it with the model), None otherwise."""
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    return HfDeepSpeedConfig(ds_config) if zero3 else None


def build_thinker(cfg: ModelConfig, ds_config: dict | None, dtype: torch.dtype = torch.float32):
    """Instantiate the Thinker in `dtype`, partitioned under ZeRO-3 when `ds_config` enables stage 3, with weights
    from `cfg.path` when given (random init from the preset otherwise)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    config = omni_config(cfg).thinker_config
    hf_ds = _zero3_hook(ds_config)
    model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(
        config, dtype=dtype, attn_implementation=str(cfg.attn_implementation)
    )
    if cfg.path is not None and is_deepspeed_checkpoint(cfg.path):
        load_weights(model, *keymap.released(consolidate(Path(cfg.path))), origin=cfg.path)
    elif cfg.path is not None:
        load_weights(model, *keymap.released(Path(cfg.path)), origin=cfg.path)
    elif cfg.compose.enabled:
        c = cfg.compose
        plan, unexpected = keymap.composition(Path(c.llm), Path(c.audio), Path(c.vision), config)
        load_weights(model, plan, unexpected, origin=f"composition ({c.llm}, {c.audio}, {c.vision})",
                     fresh=keymap.FRESH)
    model._omni_hf_ds_config = hf_ds  # keep the hook alive as long as the model
    return model


def weights_dir(cfg: ModelConfig) -> Path | None:
    """The safetensors directory behind `model.path` (a DeepSpeed checkpoint is consolidated first), or None."""
    if cfg.path is None:
        return None
    return consolidate(Path(cfg.path)) if is_deepspeed_checkpoint(cfg.path) else Path(cfg.path)


def build_talker(cfg: ModelConfig, ds_config: dict | None, dtype: torch.dtype = torch.float32
                 ) -> tuple[nn.Module, bool]:
    """The Talker (transformers' Qwen2_5OmniTalkerForConditionalGeneration) in `dtype`, partitioned under ZeRO-3 like the
    Thinker, with the weights of `model.path` when it holds a Talker; (model, whether weights were loaded). A
    Thinker-only checkpoint (the Thinker stages' exports) leaves the Talker at its random initialisation."""
    from transformers import Qwen2_5OmniTalkerForConditionalGeneration

    config = omni_config(cfg).talker_config
    hf_ds = _zero3_hook(ds_config)
    with _transformers_log_level(logging.ERROR):  # its config's Thinker ids lie outside the codec vocabulary
        model = Qwen2_5OmniTalkerForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=str(cfg.attn_implementation))
    source = weights_dir(cfg)
    plan = keymap.part(source, keymap.TALKER) if source is not None else {}
    if plan:
        load_weights(model, plan, [], origin=str(cfg.path))
    model._omni_hf_ds_config = hf_ds
    return model, bool(plan)


def build_token2wav(cfg: ModelConfig) -> nn.Module:
    """Token2Wav (codes -> waveform; not trained here) in fp32 on CPU: `model.path`'s when it has one, else a
    random initialisation (seeded) of the preset's shape, so that an export is a complete model."""
    from safetensors import safe_open
    from transformers import Qwen2_5OmniToken2WavModel

    config = omni_config(cfg).token2wav_config
    source = weights_dir(cfg)
    plan = keymap.part(source, keymap.TOKEN2WAV) if source is not None else {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        # the plain constructor: `_from_config` would partition it under a live ZeRO-3 config (it is not trained)
        model = Qwen2_5OmniToken2WavModel(config).float()
    if plan:
        state = {}
        for name, src in plan.items():
            with safe_open(src.file, framework="pt") as f:
                state[name] = f.get_tensor(src.key).float()
        model.load_state_dict(state, strict=True)
    return model.eval()


SPEAKERS_FILE = "spk_dict.pt"


def load_speakers(cfg: ModelConfig, default: str) -> dict[str, dict[str, torch.Tensor | int]]:
    """The speakers of `model.path` (its spk_dict.pt: {name: {"bos_token": Thinker id, "cond": (1, D), "ref_mel":
    (1, T, 80)}}, loaded with weights_only=True); without one, `default` alone, with the Talker's text-start token
    as its bos and a seeded random voice (conditioning vector and reference mel) for Token2Wav."""
    if cfg.path is not None:
        for folder in (Path(cfg.path), *Path(cfg.path).parents[:2]):  # an export, or a checkpoint in its run dir
            if (folder / SPEAKERS_FILE).is_file():
                return torch.load(folder / SPEAKERS_FILE, weights_only=True)
    full = omni_config(cfg)
    generator = torch.Generator().manual_seed(0)
    return {default: {"bos_token": full.talker_config.tts_text_start_token_id,
                      "cond": torch.randn(1, full.token2wav_config.dit_config.enc_emb_dim, generator=generator),
                      "ref_mel": torch.randn(1, 120, full.token2wav_config.dit_config.mel_dim, generator=generator)}}


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A complete training checkpoint of this framework (omni_train.train.checkpoint), rather than a HF directory."""
    return is_complete(path)


def run_state(ckpt: str | Path, rank: int = 0) -> dict:
    """The run state rank `rank` saved in a training checkpoint (`run_state_rank{R}.json`, written by
    omni_train.train.checkpoint), or one ConfigError saying the checkpoint is not readable."""
    path = Path(ckpt) / f"run_state_rank{rank}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{ckpt} has no readable run state ({path.name}: {e}): it is not a checkpoint of this "
                          "framework, or it is damaged") from None


def consolidate(ckpt: Path) -> Path:
    """The full fp32 weights of a DeepSpeed checkpoint as safetensors (DeepSpeed's own zero_to_fp32), written once
    into `ckpt/fp32` by rank 0 (temporary name, then rename) while the other ranks wait. The checkpoint is
    unpickled: pass only checkpoints this framework wrote (the COMPLETE marker says so)."""
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    out = ckpt / "fp32"
    if dist.rank() == 0 and not out.is_dir():
        tmp = ckpt / ".fp32.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        convert_zero_checkpoint_to_fp32_state_dict(str(ckpt.parent), str(tmp), tag=ckpt.name,
                                                   safe_serialization=True)
        tmp.rename(out)
    dist.barrier()
    return out


def load_weights(model: nn.Module, plan: dict[str, Source], unexpected: list[str], origin: str,
                 fresh: tuple[str, ...] = ()) -> None:
    """Copy the tensors `plan` names (omni_train.model.keymap) into `model`, one module at a time.

    Every parameter must be in the plan unless its name starts with one of `fresh` (it keeps its initialisation);
    keys no rule covered (`unexpected`), plan entries the model lacks and shape mismatches fail with lists.
    Under ZeRO-3 each module's parameters are gathered, rank 0 fills them from disk, and leaving the context
    re-partitions them; nothing larger than one module is ever whole on a rank.
    """
    import deepspeed
    from safetensors import safe_open

    params = dict(model.named_parameters())
    handles: dict[Path, Any] = {}

    def handle(file: Path):
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file]

    _check_plan(model, plan, unexpected, origin, fresh, handle)
    rank = dist.rank()

    def tensor(name: str) -> torch.Tensor:
        source = plan[name]
        full = handle(source.file).get_tensor(source.key)
        return full.chunk(source.parts, dim=0)[source.part] if source.parts > 1 else full

    progress = Progress(f"loading {origin}", sum(getattr(params[n], "ds_numel", params[n].numel()) *
                                                 params[n].element_size() for n in plan if n in params))
    with torch.no_grad():
        for module_name, module in model.named_modules():
            scope = f"{module_name}." if module_name else ""
            own = {scope + n: p for n, p in module.named_parameters(recurse=False) if scope + n in plan}
            own_buffers = {scope + n: b for n, b in module.named_buffers(recurse=False) if scope + n in plan}
            partitioned = [p for p in own.values() if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0, enabled=bool(partitioned)):
                if rank == 0 or not partitioned:
                    for name, p in own.items():
                        p.data.copy_(tensor(name).to(p.dtype))
            for name, b in own_buffers.items():
                b.copy_(tensor(name).to(b.dtype))
            progress.advance(sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in own.values()))
    progress.close()


def _check_plan(model: nn.Module, plan: dict[str, Source], unexpected: list[str], origin: str,
                fresh: tuple[str, ...], handle) -> None:
    """Every parameter of `model` in `plan` (unless `fresh`), every planned tensor in the model, with the model's
    shape (read from the safetensors headers through `handle(file)`); else one ConfigError listing what differs."""
    params = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    missing = sorted(n for n in params if n not in plan and not n.startswith(fresh))
    unexpected = sorted(unexpected + [k for k in plan if k not in params and k not in buffers])

    def shape(name: str) -> tuple[int, ...]:
        source = plan[name]
        dims = list(handle(source.file).get_slice(source.key).get_shape())
        dims[0] //= source.parts
        return tuple(dims)

    wrong = [f"{n}: {shape(n)} in the checkpoint, {want} in the model"
             for n, want in params.items() if n in plan and shape(n) != want]
    if missing or unexpected or wrong:
        raise ConfigError(f"checkpoint {origin} does not match the model: missing {_few(missing)}, unexpected "
                          f"{_few(unexpected)}, wrong shapes {_few(wrong)}")


def check_checkpoint(cfg: ModelConfig, talker: bool = False) -> None:
    """Before any process starts: `model.path` (a Hugging Face directory; this framework's own training checkpoints
    are trusted) holds a config.json that parses and is of a Qwen2.5-Omni kind, and safetensors files whose headers
    parse and whose tensors are those of the model the preset and that config make, name by name and shape by shape
    (the Thinker; with `talker`, the Talker too when the checkpoint has one). Reads the headers only and builds the
    model on the meta device. One ConfigError naming the problem otherwise."""
    from safetensors import SafetensorError, safe_open
    from transformers import (
        Qwen2_5OmniTalkerForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    if cfg.path is not None and is_deepspeed_checkpoint(cfg.path):
        if run_state(cfg.path).get("adapters_only"):
            raise ConfigError(f"model.path={cfg.path} is a checkpoint of a LoRA run, which holds its adapters only: "
                              "start from that run's export (RUN_DIR/export, the adapters merged in)")
    if cfg.path is None or is_deepspeed_checkpoint(cfg.path):
        return
    path = Path(cfg.path)
    if not path.is_dir():
        raise ConfigError(f"model.path={path} is not a directory: give a Hugging Face checkpoint directory (an "
                          "export, the released Qwen2.5-Omni) or a complete training checkpoint")
    try:
        config = omni_config(cfg)
    except (ValueError, TypeError, KeyError) as e:  # json's errors are ValueErrors; transformers' config checks too
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model.path={path}: its config.json cannot be read as a Qwen2.5-Omni config "
                          f"({type(e).__name__}: {str(e)[:200]})") from None
    handles: dict[Path, Any] = {}

    def handle(file: Path):
        if file not in handles:
            handles[file] = safe_open(file, framework="pt")
        return handles[file]

    try:
        with torch.device("meta"), _transformers_log_level(logging.ERROR):
            thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker_config)
            _check_plan(thinker, *keymap.released(path), str(path), (), handle)
            plan = keymap.part(path, keymap.TALKER) if talker else {}
            if plan:
                _check_plan(Qwen2_5OmniTalkerForConditionalGeneration(config.talker_config), plan, [], str(path), (),
                            handle)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"model.path={path}: its weights cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                          "the files are truncated or not safetensors: copy or export them again") from None
    if talker and not plan and config.talker_config.embedding_size != config.thinker_config.text_config.hidden_size:
        raise ConfigError(f"model.path={path} is a Thinker of hidden size {config.thinker_config.text_config.hidden_size}"
                          f" but model={cfg.preset}'s Talker reads states of size {config.talker_config.embedding_size}:"
                          " choose the model preset the Thinker was trained with")


def _few(names: list[str], limit: int = 20) -> list[str] | str:
    return names if len(names) <= limit else f"{names[:limit]} and {len(names) - limit} more"


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable and this rank's locally held (ZeRO-3 partition) parameter counts."""
    counts = defaultdict(int)
    for p in model.parameters():
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        counts["total"] += full
        counts["trainable"] += full if p.requires_grad else 0
        counts["local"] += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return dict(counts)
