"""What a training step keeps of its activations: checkpointing modes, CPU offload, and the tiled MLP.

Owns `apply(thinker, trainer_cfg)`, called once on the built Thinker before DeepSpeed wraps it:

- `trainer.checkpointing`: `none` keeps every activation; `full` recomputes every transformer layer (the audio
  encoder's, the vision blocks' and the language model's decoder layers) in the backward, keeping only each
  layer's input; `selective` does that for every `trainer.checkpoint_every`-th layer only (the layer-level selective
  checkpointing of torchtitan), trading memory back for speed when full recomputation frees memory that goes unused.
  Both go through transformers' own `activation_checkpointing_enable` (non-reentrant `torch.utils.checkpoint`).
- `trainer.offload_activations`: the checkpointed layers' saved inputs live in pinned host memory between the
  forward and the backward (each checkpoint runs inside `torch.autograd.graph.save_on_cpu`; torch saves a
  checkpoint's inputs through the enclosing saved-tensor hooks). On CPU there is nothing to move; the numerics are
  the same either way (a test runs every mode against the plain step).
- `trainer.mlp_chunk`: the language model's MLPs run `mlp_chunk` tokens at a time through DeepSpeed's `TiledMLP`,
  which keeps only the MLP's input and recomputes each tile in the backward: the intermediate activations (3 x
  intermediate size per token, 5.3x the hidden size for the 7B) exist for one tile at a time. The tile count follows
  from the row length, which is the same on every rank (rows are always `data.max_len` long, split evenly under
  sequence parallelism), so every rank makes the same ZeRO-3 parameter gathers.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from omni_train.config.schema import Checkpointing


def apply(thinker: nn.Module, trainer) -> None:
    """Configure checkpointing, offload and MLP tiling on `thinker` as `trainer` (TrainerConfig) says."""
    checkpointing(thinker, trainer)
    if trainer.mlp_chunk:
        for layer in thinker.model.language_model.layers:
            tile_mlp(layer.mlp, trainer.mlp_chunk)


def checkpointing(model: nn.Module, trainer) -> None:
    """Activation checkpointing (and offload) on any transformers model's layers, as `trainer` says."""
    if trainer.checkpointing == Checkpointing.none:
        return
    every = trainer.checkpoint_every if trainer.checkpointing == Checkpointing.selective else 1
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                          every_n_layers=every)
    if trainer.offload_activations:
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = _offloaded_checkpoint


def _offloaded_checkpoint(function, *args, **kwargs):
    """torch's non-reentrant checkpoint with its saved inputs in (pinned) host memory. transformers' own `offload`
    asks for pinned memory on CPU-only machines too, where torch has no pinned allocator and fails."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _mlp(module: nn.Module, x):
    return module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))


def _tiles(length: int, rows: int, chunk: int) -> int:
    """The tile count for `length` tokens: ceil(length / chunk), lowered until torch.chunk cuts both the sequence
    (TiledMLP's forward) and the flattened batch of `rows` tokens (its backward) into exactly that many pieces:
    TiledMLP marks the gradients ready on its last tile by count, so a shorter split would never release them."""
    tiles = math.ceil(length / chunk)
    while tiles > 1 and any(math.ceil(n / math.ceil(n / tiles)) != tiles for n in (length, rows)):
        tiles -= 1
    return tiles


def tile_mlp(mlp: nn.Module, chunk: int) -> None:
    """Make `mlp` (a gated MLP: gate_proj, up_proj, down_proj, act_fn) run `chunk` tokens at a time, recomputing each
    tile in the backward (DeepSpeed's TiledMLP); outputs and gradients equal the untiled MLP's."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def forward(self, x):
        tiles = _tiles(x.shape[-2], x.numel() // x.shape[-1], chunk)
        if tiles <= 1:
            return _mlp(self, x)
        # every parameter the tiles compute with (LoRA adapters injected later included); TiledMLP keeps the
        # trainable ones' ZeRO gradient hand-off until the last tile
        return TiledMLP.apply(_mlp, self, x, tiles, list(self.parameters()))

    mlp.forward = types.MethodType(forward, mlp)
