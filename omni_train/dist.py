"""This process's place in the process group, when there is one: rank 0 of 1 otherwise.

Base layer: the model, the export and the tools run inside a training job or alone (tests, `omni-train pairs`);
imports torch only.
"""

from __future__ import annotations

import torch


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank; nothing to wait for outside a process group."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
