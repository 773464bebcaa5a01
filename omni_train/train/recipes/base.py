"""What a recipe provides, and what its `build` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from omni_train.config.schema import Config
from omni_train.data.loader import Speech


def base_path(model_cfg) -> str | None:
    """What a PEFT adapter names as its base model: model.path, absolute (None for a preset's random init)."""
    return str(Path(model_cfg.path).resolve()) if model_cfg.path else None


@dataclass
class Trainee:
    """A built objective: the DeepSpeed engine around `module`, its LR scheduler, and `export(out_dir, tokenizer)`
    (collective) that writes what `from_pretrained` loads."""

    engine: Any
    module: Any
    scheduler: Any
    export: Callable[[Path, Any], None]


class Recipe(Protocol):
    # What every sample must hold of its speech; a sample without it is set aside with that reason.
    speech: Speech
    # Where `stage.lora` puts adapters when its targets are not given (omni_train.model.lora.TARGET_GROUPS).
    lora_targets: list[str]

    def check(self, cfg: Config) -> None:
        """The objective's own configuration checks (one ConfigError line each), before any process starts."""

    def trainable_names(self, cfg: Config) -> list[str]:
        """The module's parameter names, without weights (for `stage.trainable` checks at launch)."""

    def build(self, cfg: Config, world: int, sp=None) -> Trainee:
        """The module under its DeepSpeed engine (collective); `sp`: the run's SequenceParallel or None."""

    def summary(self, history: dict[int, dict], first: int, last: int) -> dict:
        """What the stage summary adds, from the per-step metrics of steps `first`..`last`."""
