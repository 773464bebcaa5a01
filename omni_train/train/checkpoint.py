"""Checkpoints: DeepSpeed's sharded state plus our run state, complete-or-absent, and `resume=auto`.

Owns the layout `RUN_DIR/checkpoints/step_00000010/`: DeepSpeed's per-rank model and optimizer shards, one
`run_state_rank{R}.json` per rank (step, loader position, and every RNG the run may draw from: torch's CPU
generator, this rank's CUDA generator on GPU, Python's `random` and numpy's global one; JSON, never pickle), and a
`COMPLETE` marker that rank 0 writes after every rank has finished writing. Only checkpoints with the marker count: a crash while
saving leaves a directory without it, which resume ignores and the next save removes.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from omni_train.errors import ConfigError
from omni_train.files import COMPLETE as MARKER
from omni_train.files import write_json_atomic
from omni_train.model.build import run_state


def _dir(run_dir: str) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(run_dir: str) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = _dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())


def latest(run_dir: str) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def remove_incomplete(run_dir: str) -> None:
    """Delete checkpoint directories a crash left without their marker (rank 0 only, before training)."""
    root = _dir(run_dir)
    if root.is_dir():
        for p in root.glob("step_*"):
            if not (p / MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)


def save(engine, run_dir: str, step: int, loader_state: dict, keep_last: int, extra: dict | None = None,
         protect: tuple[int, ...] = (), adapters_only: bool = False) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. `extra` joins the run state (the loop's
    bookkeeping, e.g. the best evaluation); the checkpoints of the `protect` steps survive the keep_last pruning.
    `adapters_only` (LoRA): the frozen weights are left out (they come from model.path again on resume), so the
    checkpoint holds the trained parameters and their optimizer state only."""
    rank = torch.distributed.get_rank()
    ckpt = _dir(run_dir) / tag(step)
    engine.save_checkpoint(str(_dir(run_dir)), tag=tag(step), save_latest=False,
                           exclude_frozen_parameters=adapters_only)
    write_json_atomic(
        ckpt / f"run_state_rank{rank}.json",
        {
            "step": step,
            "world_size": torch.distributed.get_world_size(),
            "adapters_only": adapters_only,
            "loader": loader_state,
            **rng_state(),
            **(extra or {}),
        },
    )
    torch.distributed.barrier()
    if rank == 0:
        write_json_atomic(ckpt / MARKER, {"step": step})
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            if int(old.name.removeprefix("step_")) not in protect:
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return ckpt


def written_by(ckpt: Path) -> int:
    """The number of ranks that wrote a checkpoint."""
    state = run_state(ckpt)
    if "world_size" not in state:
        raise ConfigError(f"{ckpt}: its run state names no world_size: it is not a checkpoint of this framework, or "
                          "it is damaged")
    return int(state["world_size"])


UNIVERSAL = "universal"  # the subdirectory a checkpoint's resharding-ready copy is written to


def to_universal(ckpt: Path) -> Path:
    """DeepSpeed's universal checkpoint of `ckpt` (deepspeed.checkpoint.ds_to_universal: every parameter's fp32
    weights and optimizer moments whole, loadable by any number of ranks), written once into `ckpt/universal` by
    rank 0 (temporary name, then rename; its console output in `ckpt/universal.log`) while the other ranks wait.
    Reads DeepSpeed's pickled shards: only for checkpoints this framework wrote (the COMPLETE marker says so)."""
    import argparse
    import contextlib

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = ckpt / UNIVERSAL
    if torch.distributed.get_rank() == 0 and not out.is_dir():
        tmp = ckpt / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with open(ckpt / f"{UNIVERSAL}.log", "w") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            ds_to_universal(args)
        tmp.rename(out)
    torch.distributed.barrier()
    return out


def loader_states(ckpt: Path) -> list[dict]:
    """The loader state of every data-parallel rank that wrote `ckpt` (one per rank; the ranks of a
    sequence-parallel group hold the same one), for re-dealing the data on another layout."""
    states = {}
    for path in sorted(ckpt.glob("run_state_rank*.json")):
        loader = json.loads(path.read_text())["loader"]
        states.setdefault(loader.get("rank", int(path.stem.removeprefix("run_state_rank"))), loader)
    return [states[r] for r in sorted(states)]


def load(engine, ckpt: Path) -> dict:
    """Restore the engine (weights, optimizer, LR schedule) and this rank's RNG; return its run state.

    On another number of ranks than wrote it, the engine (built with DeepSpeed's `checkpoint.load_universal`)
    loads the checkpoint's universal copy (`to_universal`): weights, AdamW moments and the schedule, resharded.
    The run state is then rank 0's, with `resharded` set and no RNG restored (the new ranks' generators have no
    counterpart in the old run); the data position is re-dealt by the caller from `loader_states`."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    old_world = written_by(ckpt)
    if old_world != world:
        universal = to_universal(ckpt)
        load_path, _ = engine.load_checkpoint(str(ckpt), tag=universal.name,
                                              load_module_strict=not run_state(ckpt).get("adapters_only"))
        if load_path is None:
            raise ConfigError(f"DeepSpeed could not load {universal}, the universal copy of {ckpt}")
        return {**run_state(ckpt), "resharded": old_world}
    state = run_state(ckpt, rank)
    # a LoRA checkpoint lacks the frozen weights: the module built from model.path already holds them
    load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                          load_module_strict=not state.get("adapters_only", False))
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load {ckpt}: its shards are missing or unreadable")
    restore_rng(state)
    return state


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's random generators, as JSON values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch_rng": _encode(torch.get_rng_state()),
             "python_rng": [version, list(words), gauss],
             "numpy_rng": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda_rng"] = _encode(torch.cuda.get_rng_state())  # this rank's device (init_distributed set it)
    return state


def restore_rng(state: dict) -> None:
    """Put back what rng_state saved. A checkpoint written on CPU resumed on a GPU leaves the CUDA generator seeded
    as the run seeded it; one written before the Python and numpy generators were saved leaves those as they are."""
    torch.set_rng_state(_decode(state["torch_rng"]))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda_rng"]))
    if "python_rng" in state:
        version, words, gauss = state["python_rng"]
        random.setstate((version, tuple(words), gauss))
    if "numpy_rng" in state:
        kind, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
