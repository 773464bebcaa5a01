"""Checks shared by the LoRA tests: a merged export against its base plus the PEFT adapter's own delta."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def check_merged_export(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], peft_model,
                        rename, fully: set[str]) -> int:
    """Every tensor of the merged export equals the base export's bit for bit, except that an adapted layer's weight
    is exactly base + PEFT's `get_delta_weight` of the loaded adapter (so the frozen base did not move by one bit
    during training), and the `fully` trained tensors (checkpoint names) differ. `rename` maps the PEFT model's
    in-memory module names to checkpoint names. Returns the number of adapted layers checked."""
    from peft.tuners.lora import LoraLayer

    assert merged.keys() == base.keys()
    adapted = {rename(n): m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    for name in merged:
        module = name.rsplit(".", 1)[0]
        if name in fully:
            assert not torch.equal(merged[name], base[name]), f"{name} was to train fully and did not move"
        elif module in adapted and name.endswith(".weight"):
            delta = adapted[module].get_delta_weight("default").float()
            expected = (base[name].float() + delta).to(base[name].dtype)
            assert torch.equal(merged[name], expected), f"{name}: merged != base + B @ A x scaling"
            assert delta.abs().max() > 0, f"{name}: the adapter did not train"
        else:
            assert torch.equal(merged[name], base[name]), f"{name}, a frozen weight, moved"
    return len(adapted)


def weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(export / "model.safetensors")
