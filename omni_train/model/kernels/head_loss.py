"""The LM head and its cross-entropy fused and tiled: per-token losses without the full-vocabulary logits.

Owns: `chunked_cross_entropy`, the per-token cross-entropy of `hidden @ weight.T` computed `chunk` rows at a time;
only one chunk's logits (chunk x vocabulary, fp32) exist at any moment, in the forward and in the backward, which
recomputes them (one extra head matmul per chunk) instead of keeping them. For the 7B at 32k tokens the plain path
holds 32k x 152k fp32 logits (20 GB) plus their log-softmax and gradient; this one holds `chunk` rows of them.

`HeadLoss` applies it to a model's LM head under ZeRO-3: the head's weight is registered as an external parameter
of this module (`deepspeed.zero.register_external_parameter`), so DeepSpeed gathers it once for the forward and
once for the backward, whatever the number of chunks or labelled tokens: the collective pattern stays independent
of the data, as everywhere in this framework.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        losses = [F.cross_entropy(F.linear(hidden[s:s + chunk], weight).float(), targets[s:s + chunk],
                                  reduction="none")
                  for s in range(0, hidden.shape[0], chunk)]
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            # d(-log softmax(z)[t]) / dz = softmax(z) - onehot(t), times the incoming per-token gradient
            dz = F.linear(h, weight).float().softmax(dim=-1)
            dz[torch.arange(len(t), device=t.device), t] -= 1.0
            dz *= grad_losses[s:s + ctx.chunk, None]
            if grad_hidden is not None:
                grad_hidden[s:s + ctx.chunk] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += dz.T @ h.float()
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of the logits `hidden @ weight.T` (hidden: N x H, weight: V x H, targets: N),
    equal to `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")` and its gradients."""
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)


class HeadLoss(nn.Module):
    """Per-token losses of `head` (an nn.Linear without bias, the LM head) at the given hidden states, tiled."""

    def __init__(self, head: nn.Linear, chunk: int):
        super().__init__()
        if head.bias is not None:
            raise ValueError("HeadLoss takes a head without bias (the Thinker's and the Talker's have none)")
        object.__setattr__(self, "head", head)  # not a submodule: the head stays where the checkpoint has it
        self.chunk = chunk
        if hasattr(head.weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, head.weight)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(hidden, self.head.weight, targets, self.chunk)
