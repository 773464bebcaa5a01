"""Checkpoint key mappings into the Thinker: what is loaded from where, written down as rules.

Owns: the rules that turn a checkpoint's tensor names into the Thinker's parameter names (transformers 5 module
names: `model.language_model.*`, `model.audio_tower.*`, `model.visual.*`, `lm_head.*`), for
- the released Qwen2.5-Omni layout (`thinker.model.*`, `thinker.audio_tower.*`, `thinker.visual.*`,
  `thinker.lm_head.*`; Talker and Token2Wav ignored), a Thinker saved by transformers (the same without `thinker.`),
  and this framework's exports (written in that hub layout, see `hub_name`); and
- stage-1 composition, the paper's initialisation, from three separate models:

  | source (on-disk layout)                       | key                                  | Thinker parameter                  |
  |-----------------------------------------------|--------------------------------------|------------------------------------|
  | Qwen2.5 LLM (`Qwen2ForCausalLM`)              | `model.*`                            | `model.language_model.*`           |
  |                                               | `lm_head.weight` (tied: embed_tokens)| `lm_head.weight`                   |
  | Whisper (`WhisperModel`, or `model.`-prefixed | `encoder.conv1.*`, `encoder.conv2.*`, | `model.audio_tower.` + same name  |
  | `WhisperForConditionalGeneration`)            | `encoder.layers.*`                   |                                    |
  |                                               | `encoder.layer_norm.*`               | `model.audio_tower.ln_post.*`      |
  |                                               | `encoder.embed_positions.weight`     | not loaded: Omni computes sinusoids|
  |                                               | `decoder.*`, `proj_out.*`            | not loaded                         |
  | Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) | `visual.blocks.N.attn.qkv.*`     | `model.visual.blocks.N.attn.{q,k,v}.*` (thirds, in that order) |
  |                                               | other `visual.*` but the merger      | `model.visual.` + same name        |
  |                                               | `visual.merger.*`, `model.*`, `lm_head.*` | not loaded                    |

  The new adapters start fresh (`FRESH`): the audio projection `model.audio_tower.proj`, the audio begin/end
  embedding `model.audio_tower.audio_bos_eos_token` and the vision merger `model.visual.merger` (Qwen2.5-VL's merger
  projects into Qwen2.5-VL's LLM, not this one). A key no rule covers is "unexpected", a Thinker parameter nothing
  maps to (and not fresh) is "missing"; either fails the load with the lists (omni_train.model.build.load_weights).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from omni_train.errors import ConfigError

# (pattern, replacement or None to skip the key); the first rule that matches a key decides.
Rules = list[tuple[str, str | None]]

THINKER: Rules = [
    (r"^(?:talker|token2wav|reference)\.", None),
    (r"^(?:thinker\.)?audio_tower\.(.*)", r"model.audio_tower.\1"),
    (r"^(?:thinker\.)?visual\.(.*)", r"model.visual.\1"),
    (r"^(?:thinker\.)?model\.((?:language_model|audio_tower|visual)\..*)", r"model.\1"),
    (r"^(?:thinker\.)?model\.(.*)", r"model.language_model.\1"),
    (r"^(?:thinker\.)?lm_head\.(.*)", r"lm_head.\1"),
]
# The Talker and Token2Wav keep transformers' module names in every layout (released, transformers' save, ours);
# `reference.` is the frozen DPO reference inside a Talker stage's training checkpoint.
TALKER: Rules = [(r"^talker\.(.*)", r"\1"), (r".*", None)]
TOKEN2WAV: Rules = [(r"^token2wav\.(.*)", r"\1"), (r".*", None)]
LLM: Rules = [(r"^model\.(.*)", r"model.language_model.\1"), (r"^lm_head\.(.*)", r"lm_head.\1")]
WHISPER: Rules = [
    (r"^(?:model\.)?encoder\.layer_norm\.(.*)", r"model.audio_tower.ln_post.\1"),
    (r"^(?:model\.)?encoder\.embed_positions\.", None),
    (r"^(?:model\.)?encoder\.((?:conv1|conv2|layers)\..*)", r"model.audio_tower.\1"),
    (r"^(?:model\.)?decoder\.", None),
    (r"^proj_out\.", None),
]
VISION: Rules = [
    (r"^(?:model\.)?visual\.merger\.", None),
    (r"^(?:model\.)?visual\.(.*)", r"model.visual.\1"),
    (r"^(?:model\.)?language_model\.", None),
    (r"^model\.", None),
    (r"^lm_head\.", None),
]
FRESH = ("model.audio_tower.proj.", "model.audio_tower.audio_bos_eos_token.", "model.visual.merger.")
_QKV = re.compile(r"^(model\.visual\.blocks\.\d+\.attn\.)qkv\.(weight|bias)$")

# Architecture fields each source's config must share with the Thinker's (shapes alone miss head counts).
_MUST_MATCH = {
    "llm": ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
            "vocab_size"),
    "audio": ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins"),
    "vision": ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "spatial_merge_size",
               "temporal_patch_size", "window_size", "fullatt_block_indexes"),
}


@dataclass(frozen=True)
class Source:
    """Where one Thinker tensor comes from: a key in a safetensors file, optionally one of `parts` equal slices
    (along dim 0) of it."""

    file: Path
    key: str
    part: int = 0
    parts: int = 1


def checkpoint_keys(path: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file holding it (sharded or single-file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise ConfigError(f"{path} has no model.safetensors(.index.json): only safetensors checkpoints load")


def apply(rules: Rules, keys: dict[str, Path]) -> tuple[dict[str, Source], list[str]]:
    """Map checkpoint keys by `rules`: (Thinker name -> Source, keys no rule covers)."""
    plan, unexpected = {}, []
    for key, file in keys.items():
        for pattern, target in rules:
            if re.match(pattern, key):
                if target is not None:
                    name = re.sub(pattern, target, key)
                    qkv = _QKV.match(name)
                    if qkv:  # Qwen2.5-VL fuses q, k, v; the Omni vision tower keeps them apart
                        for i, part in enumerate("qkv"):
                            plan[f"{qkv[1]}{part}.{qkv[2]}"] = Source(file, key, i, 3)
                    else:
                        plan[name] = Source(file, key)
                break
        else:
            unexpected.append(key)
    return plan, unexpected


def released(path: Path) -> tuple[dict[str, Source], list[str]]:
    """A released Qwen2.5-Omni checkpoint, a transformers-saved Thinker or one of our exports."""
    return apply(THINKER, checkpoint_keys(path))


def part(path: Path, rules: Rules) -> dict[str, Source]:
    """The Talker's or Token2Wav's tensors in a full checkpoint (empty when it has none, e.g. a Thinker export)."""
    return apply(rules, checkpoint_keys(path))[0]


def composition(llm: Path, audio: Path, vision: Path, thinker_config) -> tuple[dict[str, Source], list[str]]:
    """The paper's stage-1 initialisation: (Thinker name -> Source, unexpected keys prefixed by their source).
    Raises ConfigError when a source's architecture differs from the Thinker's."""
    sub = {"llm": thinker_config.text_config, "audio": thinker_config.audio_config,
           "vision": thinker_config.vision_config}
    plan: dict[str, Source] = {}
    unexpected: list[str] = []
    for role, path, rules in (("llm", llm, LLM), ("audio", audio, WHISPER), ("vision", vision, VISION)):
        config = _source_config(path, role)
        wrong = [f"{k}={config.get(k)} (the Thinker has {getattr(sub[role], k, None)})"
                 for k in _MUST_MATCH[role] if config.get(k) != getattr(sub[role], k, None)]
        if wrong:
            raise ConfigError(f"model.compose.{role}={path} does not match the model preset: {', '.join(wrong)}; "
                              "choose the preset of this size or the matching checkpoint")
        part, extra = apply(rules, checkpoint_keys(path))
        if role == "llm" and "lm_head.weight" not in part and config.get("tie_word_embeddings"):
            part["lm_head.weight"] = part.get("model.language_model.embed_tokens.weight")
        plan.update({k: v for k, v in part.items() if v is not None})
        unexpected += [f"{role}: {k}" for k in extra]
    return plan, unexpected


def _source_config(path: Path, role: str) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.compose.{role}={path} has no config.json: give a Hugging Face checkpoint directory")
    config = json.loads(file.read_text())
    # Qwen2.5-VL nests the vision tower's config; Whisper and Qwen2 keep theirs at the top level (or under
    # text_config for the newer multimodal layouts).
    if role == "vision":
        return config.get("vision_config", {})
    if role == "llm" and "text_config" in config and "hidden_size" not in config:
        return config["text_config"]
    return config


def hub_name(name: str) -> str:
    """A Thinker parameter name in the layout transformers saves (and the released checkpoint uses, minus
    `thinker.`): what our exports write, so that any loader of the released layout reads them."""
    for prefix, hub in (("model.language_model.", "model."), ("model.audio_tower.", "audio_tower."),
                        ("model.visual.", "visual.")):
        if name.startswith(prefix):
            return hub + name[len(prefix):]
    return name
