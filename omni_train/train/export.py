"""Export: ZeRO-3 shards -> a Hugging Face checkpoint directory that `from_pretrained` loads.

Owns: gathering the partitioned parameters one module at a time (never the whole model on one rank at once
beyond what rank 0 writes out), writing safetensors shards of bounded size with an index, the model config, and the
tokenizer with the processor settings that transformers' Qwen2_5OmniProcessor reads (`save_processor`), into a
temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from omni_train import dist
from omni_train.progress import Progress

MAX_SHARD_BYTES = 5 * 1024**3
ADAPTER_DIR = "adapter"  # a LoRA stage's PEFT adapter directory, beside RUN_DIR/export (merged)


def _state_dict_stream(model: nn.Module):
    """Yield (name, full CPU tensor) for every parameter and persistent buffer; collective under ZeRO-3. A LoRA
    layer (omni_train.model.lora) is yielded as the plain layer it adapts, its adapter merged into the weight."""
    import deepspeed

    from omni_train.model.lora import layers, merged_weight

    rank = dist.rank()
    adapted = layers(model)
    inside = tuple(f"{name}." for name in adapted)
    for module_name, module in model.named_modules():
        if module_name.startswith(inside):
            continue  # a LoRA layer's base layer, adapters and dropout: merged below
        scope = f"{module_name}." if module_name else ""
        if module_name in adapted:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if rank == 0:
                    yield scope + "weight", merged_weight(module).detach().to("cpu", copy=True)
                    bias = module.get_base_layer().bias
                    if bias is not None:
                        yield scope + "bias", bias.detach().to("cpu", copy=True)
            continue
        params = list(module.named_parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if rank == 0:
                    for name, p in params:
                        yield scope + name, p.detach().to("cpu", copy=True)
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in module.named_buffers(recurse=False):
            if name not in skip and rank == 0:
                yield scope + name, b.detach().to("cpu", copy=True)


def _begin(out: Path) -> Path:
    """Rank 0: an empty temporary directory beside `out` to write into."""
    tmp = out.with_name(f".{out.name}.tmp")
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> Path | None:
    """Rank 0: the complete temporary directory replaces `out`; then every rank waits for it."""
    if dist.rank() == 0:
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    dist.barrier()
    return out if dist.rank() == 0 else None


def export_pretrained(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, rename=None, config=None,
                      architecture: str | None = None, extra: dict[str, object] | None = None) -> Path | None:
    """Write `model` (a transformers PreTrainedModel, possibly ZeRO-3 partitioned) to `out_dir`, each tensor under
    `rename(name)` (the checkpoint layout, e.g. omni_train.model.keymap.hub_name for the Thinker; default: as named).
    `config` (default `model.config`) and `architecture` (default the model's class name) go to config.json;
    `extra` maps file names to objects saved beside the weights with torch.save (e.g. spk_dict.pt).

    Collective: every rank must call it. Returns the directory on rank 0, None elsewhere.
    """
    from safetensors.torch import save_file

    rank = dist.rank()
    out = Path(out_dir)
    tmp = _begin(out)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    progress = Progress(f"export to {out}", sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                                                 for p in model.parameters()))
    for name, tensor in _state_dict_stream(model):
        name = rename(name) if rename else name
        nbytes = tensor.numel() * tensor.element_size()
        progress.advance(nbytes)
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            save_file(shards[-1], tmp / f"part-{len(shards):05d}.safetensors", metadata={"format": "pt"})
            shards[-1] = dict.fromkeys(shards[-1])  # keep names for the index, free the tensors
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes

    progress.close()
    if rank == 0:
        n = len(shards)
        save_file(shards[-1], tmp / f"part-{n:05d}.safetensors", metadata={"format": "pt"})
        if n == 1:
            (tmp / "part-00001.safetensors").rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                final = f"model-{i:05d}-of-{n:05d}.safetensors"
                (tmp / f"part-{i:05d}.safetensors").rename(tmp / final)
                weight_map.update(dict.fromkeys(shard, final))
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config = config if config is not None else model.config
        config.architectures = [architecture or type(model).__name__]
        config.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            save_processor(tmp, tokenizer)
    return _commit(tmp, out)


def save_processor(out_dir: Path, tokenizer) -> None:
    """The processor files of Qwen2.5-Omni's released checkpoint, with the values our data path uses: the tokenizer
    (its chat template renders as data_prep.chatml does, omni_train.tokenizer) and one `preprocessor_config.json`
    holding transformers' WhisperFeatureExtractor settings (16 kHz, 128 mel bins, hop 160, n_fft 400, clips up to
    omni-prep's max_audio_seconds) and its Qwen2-VL image processor's (14-px patches, temporal patch 2, 2 x 2 merge,
    CLIP mean and std, omni-prep's image pixel budget), under `processor_class: Qwen2_5OmniProcessor`.

    No video_preprocessor_config.json, as in the released checkpoint: transformers reads the video processor's
    settings from preprocessor_config.json, and Qwen2_5OmniProcessor's own video defaults (128..768 merged tokens per
    frame) equal omni-prep's."""
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from data_prep.config import PrepConfig
    from data_prep.layout import HOP, MERGE, PATCH, SAMPLE_RATE, TEMPORAL_PATCH
    from omni_train.data.features import CLIP_MEAN, CLIP_STD, N_FFT, N_MELS

    prep = PrepConfig()
    audio = WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE, hop_length=HOP, n_fft=N_FFT,
                                    chunk_length=int(prep.max_audio_seconds), return_attention_mask=True)
    # The PIL variant: its settings are the same as the torchvision one's (it names itself Qwen2VLImageProcessor),
    # and it needs no torchvision to be built here.
    vision = Qwen2VLImageProcessorPil(min_pixels=prep.vision.image_min_pixels, max_pixels=prep.vision.image_max_pixels,
                                      patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE,
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    # The released checkpoint's layout: both in one file (transformers' processor would nest them in
    # processor_config.json, but it cannot be built without torchvision's video processor).
    settings = {**json.loads(audio.to_json_string()), **json.loads(vision.to_json_string()),
                "processor_class": "Qwen2_5OmniProcessor"}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out_dir)


def export_adapter(model: nn.Module, out_dir: str | os.PathLike, lora, base: str | None, rename=None) -> Path | None:
    """The PEFT adapter directory of a LoRA-trained `model` (a transformers model, or a module laid out like one,
    e.g. the full Qwen2.5-Omni's thinker/talker/token2wav): `adapter_config.json` (PEFT's LoraConfig: `lora`'s r,
    alpha and dropout, the adapted modules as transformers names them in memory, the fully trained ones as
    `modules_to_save`, `base`) and `adapter_model.safetensors` with PEFT's keys (`base_model.model.` + name, adapter
    name dropped): the adapters under the checkpoint's names (`rename(name)`), the fully trained modules under
    transformers' module names. `PeftModel.from_pretrained(base model, out_dir)` loads it. Collective, like
    export_pretrained."""
    import deepspeed
    from safetensors.torch import save_file

    from omni_train.model.lora import adapter_key, layers, linear_names, peft_config

    rename = rename or (lambda name: name)
    rank = dist.rank()
    out = Path(out_dir)
    tmp = _begin(out)
    adapted = layers(model)
    fully = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters()
                    if p.requires_grad and ".lora_" not in name})
    tensors = {}
    # The adapters under the checkpoint's names (PEFT maps them onto transformers' modules); the fully trained
    # modules under transformers' own names, the only ones PEFT 0.21 finds modules_to_save by.
    for own, key in [*(([(f"{n}.{k}", p) for k, p in m.named_parameters() if k.startswith("lora_")],
                        lambda name: rename(adapter_key(name))) for n, m in adapted.items()),
                     *(([(f"{n}.{k}", p) for k, p in model.get_submodule(n).named_parameters(recurse=False)],
                        lambda name: name) for n in fully)]:
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if rank == 0:
                for name, p in own:
                    tensors["base_model.model." + key(name)] = p.detach().to("cpu", copy=True)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        peft_config(list(adapted), linear_names(model), lora.r, lora.alpha, lora.dropout, fully,
                    base).save_pretrained(tmp)
    return _commit(tmp, out)


def omni_layout(thinker: nn.Module, talker: nn.Module, token2wav: nn.Module | None):
    """The three parts as one module laid out like `Qwen2_5OmniForConditionalGeneration` (thinker, talker,
    token2wav) and the rename into the released checkpoint's names (the Thinker's in the hub layout)."""
    from omni_train.model.keymap import hub_name

    whole = nn.Module()
    whole.thinker, whole.talker = thinker, talker
    if token2wav is not None:
        whole.token2wav = token2wav

    def rename(name: str) -> str:
        return "thinker." + hub_name(name[len("thinker."):]) if name.startswith("thinker.") else name

    return whole, rename


def export_omni(thinker: nn.Module, talker: nn.Module, token2wav: nn.Module, config, speakers: dict,
                out_dir: str | os.PathLike, tokenizer=None) -> Path | None:
    """The full model (Thinker + Talker + Token2Wav, released layout, with its spk_dict.pt) that transformers'
    `Qwen2_5OmniForConditionalGeneration.from_pretrained` loads. Collective, like export_pretrained."""
    from omni_train.model.build import SPEAKERS_FILE

    whole, rename = omni_layout(thinker, talker, token2wav)
    return export_pretrained(whole, out_dir, tokenizer, rename, config=config,
                             architecture="Qwen2_5OmniForConditionalGeneration", extra={SPEAKERS_FILE: speakers})
