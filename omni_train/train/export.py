"""Export: ZeRO-3 shards -> a Hugging Face checkpoint directory that `from_pretrained` loads.

Owns: gathering the partitioned parameters one module at a time (never the whole model on one rank at once
beyond what rank 0 writes out), writing safetensors shards of bounded size with an index, the model config and
the tokenizer, into a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from omni_train import dist

MAX_SHARD_BYTES = 5 * 1024**3


def _state_dict_stream(model: nn.Module):
    """Yield (name, full CPU tensor) for every parameter and persistent buffer; collective under ZeRO-3."""
    import deepspeed

    rank = dist.rank()
    for module_name, module in model.named_modules():
        scope = f"{module_name}." if module_name else ""
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
    tmp = out.with_name(f".{out.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in _state_dict_stream(model):
        name = rename(name) if rename else name
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            save_file(shards[-1], tmp / f"part-{len(shards):05d}.safetensors", metadata={"format": "pt"})
            shards[-1] = dict.fromkeys(shards[-1])  # keep names for the index, free the tensors
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes

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
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    dist.barrier()
    return out if rank == 0 else None


def export_omni(thinker: nn.Module, talker: nn.Module, token2wav: nn.Module, config, speakers: dict,
                out_dir: str | os.PathLike, tokenizer=None) -> Path | None:
    """The full model (Thinker + Talker + Token2Wav, released layout, with its spk_dict.pt) that transformers'
    `Qwen2_5OmniForConditionalGeneration.from_pretrained` loads. Collective, like export_pretrained."""
    from omni_train.model.keymap import hub_name
    from omni_train.model.build import SPEAKERS_FILE

    whole = nn.Module()
    whole.thinker, whole.talker, whole.token2wav = thinker, talker, token2wav

    def rename(name: str) -> str:
        return "thinker." + hub_name(name[len("thinker."):]) if name.startswith("thinker.") else name

    return export_pretrained(whole, out_dir, tokenizer, rename, config=config,
                             architecture="Qwen2_5OmniForConditionalGeneration", extra={SPEAKERS_FILE: speakers})
