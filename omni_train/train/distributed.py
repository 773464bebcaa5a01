"""Ranks and the process group: where this process stands, joining the group, its collective timeouts, and leaving
it.

Owns: this process's rank and world size from torchrun's or SLURM's variables (`place`) and its GPU
(`local_gpu`); starting the process group from them (gloo on CPU, NCCL on GPU) with each rank's heartbeat
(omni_train/train/liveness.py); and the two timeouts a collective waits for a peer:
- `trainer.startup_timeout_min` while ranks do unequal work: start-up (rank 0 alone may consolidate a DeepSpeed
  checkpoint or read weights), the first step (lazy allocations), checkpoint saves and the export (rank 0 writes
  while the others wait at a barrier), where a 7B takes minutes;
- `trainer.dist_timeout_min` during the steps, where every rank does the same work and a silent peer is a lost
  one (torchtitan likewise shortens its timeout after the first step).
The group starts with the long one; `step_timeout` switches to the short one and `unequal_work` switches back for
the length of a block.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch

from omni_train.errors import ConfigError
from omni_train.train import liveness


def on_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed(timeout_min: float) -> tuple[int, int]:
    """Join the process group described by torchrun-style environment variables (a lone process forms a group of
    one), its collectives waiting up to `timeout_min` minutes for a peer. Returns (rank, world_size)."""
    import deepspeed

    place()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if on_gpu():
        torch.cuda.set_device(local_gpu())
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            # On GPUs the model's collectives (ZeRO-3, Ulysses) run on NCCL, and the loop's small CPU tensors
            # (counts, the step's loss and figures, checks) on gloo: one group, a backend per device type.
            dist_backend="cpu:gloo,cuda:nccl" if on_gpu() else "gloo",
            timeout=timedelta(minutes=timeout_min),
            verbose=False,
        )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    liveness.start(rank, world)
    return rank, world


def place() -> tuple[int, int]:
    """(rank, world size) of this process from torchrun's variables, or from SLURM's for a task `srun` started
    directly (copied into torchrun's, which the rendezvous reads); (0, 1) for a lone process. Reads the environment
    only: work split into independent parts (`omni-train pairs`) needs no process group."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        _ranks_from_slurm()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_gpu() -> torch.device:
    """This process's GPU: cuda:LOCAL_RANK (torchrun's variable, or srun's SLURM_LOCALID once `place` has copied it;
    0 for a lone process). A ConfigError when this node shows the process fewer GPUs."""
    index, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if index >= visible:
        raise ConfigError(f"local rank {index} has no GPU of its own: this process sees {visible} "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one "
                          "process per GPU of the node, each seeing them all")
    return torch.device("cuda", index)


def _ranks_from_slurm() -> None:
    """Ranks and rendezvous of a process started by `srun` directly (one task per GPU, no torchrun): rank, world and
    local rank from SLURM's task variables, the master on the job's first node."""
    env = os.environ
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("node[03-05,07],gpu1" -> "node03")."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0] + "]"
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def shutdown() -> None:
    """Leave the process group (and its sub-groups) explicitly at the end of a successful run: left to interpreter
    exit, gloo's worker threads can be torn down while joinable and abort the process (SIGABRT, "terminate called
    without an active exception"), which torchrun reports as a failed rank."""
    liveness.stop()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _set_timeout(minutes: float) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.distributed_c10d._set_pg_timeout(timedelta(minutes=minutes))


class Timeouts:
    """The run's two collective timeouts (minutes); see the module docstring."""

    def __init__(self, startup_min: float, step_min: float):
        self.startup_min, self.step_min = startup_min, step_min

    def steps(self) -> None:
        """From now on every rank does the same work: a peer silent for step_min is lost."""
        _set_timeout(self.step_min)

    @contextlib.contextmanager
    def unequal_work(self):
        """A block in which one rank may work alone while the others wait (checkpoint save, export)."""
        _set_timeout(self.startup_min)
        try:
            yield
        finally:
            _set_timeout(self.step_min)
