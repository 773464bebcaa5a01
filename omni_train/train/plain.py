"""One process without DeepSpeed (`deepspeed=none`): the single-GPU path, for LoRA on one card above all.

Owns `PlainEngine`, the part of DeepSpeed's engine interface the loop, the evaluation and the checkpoints use
(`engine(**batch)`, `backward`, `step`, `was_step_applied`, `get_global_grad_norm`, `train`/`eval`, `module`,
`save_checkpoint`, `load_checkpoint`), over plain torch: the module on this process's device, gradients
accumulated over `trainer.grad_accum` micro-batches (each backward scaled by 1 / grad_accum, as DeepSpeed's), the
global gradient norm clipped to `trainer.grad_clip`, and a step whose norm is not finite skipped (no optimizer or
scheduler step; gradients cleared), as DeepSpeed skips it. A checkpoint directory holds `model.safetensors`
(every parameter, or with `exclude_frozen_parameters` the trained ones), `optimizer.pt` (tensors and numbers only,
read back with `weights_only=True`) and `scheduler.json`.

The model keeps the run's precision (`trainer.precision`); trained LoRA adapters are kept in fp32 beside a bf16 base (PEFT casts their inputs
and outputs), the role DeepSpeed's fp32 master weights play under ZeRO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from omni_train.files import write_json_atomic


class PlainEngine:
    def __init__(self, module: nn.Module, optimizer, scheduler, grad_accum: int, grad_clip: float):
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device(
            "cpu")
        self.module = module.to(self.device)
        self.optimizer, self.lr_scheduler = optimizer, scheduler
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.trained = [p for p in module.parameters() if p.requires_grad]
        self.micro_steps = 0
        self._applied, self._norm = True, None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        """After each micro-batch; the optimizer steps after the last of `grad_accum`."""
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        limit = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.trained, limit))
        self._norm, self._applied = norm, math.isfinite(norm)
        if self._applied:
            self.optimizer.step()
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return self._applied

    def get_global_grad_norm(self) -> float | None:
        return self._norm

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False,
                        exclude_frozen_parameters: bool = False) -> None:
        from safetensors.torch import save_file

        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in self.module.named_parameters()
                 if p.requires_grad or not exclude_frozen_parameters}
        save_file(state, out / "model.safetensors.tmp", metadata={"format": "pt"})
        (out / "model.safetensors.tmp").rename(out / "model.safetensors")
        torch.save(self.optimizer.state_dict(), out / "optimizer.pt.tmp")
        (out / "optimizer.pt.tmp").rename(out / "optimizer.pt")
        scheduler = {k: v for k, v in self.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        write_json_atomic(out / "scheduler.json", {**scheduler, "micro_steps": self.micro_steps})

    def load_checkpoint(self, load_dir: str, tag: str, load_module_strict: bool = True):
        from safetensors.torch import load_file

        src = Path(load_dir) / tag
        if not (src / "model.safetensors").is_file():
            return None, None
        state = load_file(src / "model.safetensors", device=str(next(self.module.parameters()).device))
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [n for n in missing if n in dict(self.module.named_parameters())]
        if unexpected or (load_module_strict and missing):
            raise RuntimeError(f"{src} does not match the module: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(torch.load(src / "optimizer.pt", weights_only=True))
        scheduler = json.loads((src / "scheduler.json").read_text())
        self.micro_steps = scheduler.pop("micro_steps")
        self.lr_scheduler.load_state_dict({**self.lr_scheduler.state_dict(), **scheduler})
        return str(src), {}
