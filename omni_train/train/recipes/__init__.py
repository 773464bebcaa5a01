"""One recipe per objective: how a stage builds its trained module, which data it needs, how it exports and what
its summary adds. The loop (omni_train/train/loop.py) asks the recipe and never branches on the objective; a new
objective is a file here and a line in RECIPES (and its name in omni_train.config.schema.Objective).

A recipe provides:
- `speech`: what every sample must hold of its speech (omni_train.data.loader.Speech);
- `check(cfg)`: the objective's own configuration checks (one ConfigError line each), before any process starts;
- `trainable_names(cfg)`: the module's parameter names, without weights (for `stage.trainable` checks at launch);
- `build(cfg, world, sp) -> Trainee`: the module under its DeepSpeed engine, and how to export it;
- `summary(history, first, last)`: what the stage summary adds from the per-step metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omni_train.config.schema import Objective


@dataclass
class Trainee:
    """A built objective: the DeepSpeed engine around `module`, its LR scheduler, and `export(out_dir, tokenizer)`
    (collective) that writes what `from_pretrained` loads."""

    engine: Any
    module: Any
    scheduler: Any
    export: Callable[[Path, Any], None]


def recipe(objective: Objective):
    """The recipe of `stage.objective`."""
    from omni_train.train.recipes.talker import TalkerRecipe
    from omni_train.train.recipes.thinker import ThinkerRecipe

    recipes = {Objective.thinker: ThinkerRecipe(), Objective.talker_sft: TalkerRecipe(Objective.talker_sft),
               Objective.talker_dpo: TalkerRecipe(Objective.talker_dpo)}
    return recipes[Objective(objective)]
