"""One recipe per objective: how a stage builds its trained module, which data it needs, how it exports and what
its summary adds (the interface: base.Recipe). The loop (omni_train/train/loop.py) asks the recipe and never
branches on the objective; a new objective is a file here, a line in RECIPES, and its name in
omni_train.config.schema.Objective."""

from __future__ import annotations

from omni_train.config.schema import Objective
from omni_train.train.recipes.base import Recipe
from omni_train.train.recipes.talker import TalkerRecipe
from omni_train.train.recipes.thinker import ThinkerRecipe

RECIPES: dict[Objective, Recipe] = {
    Objective.thinker: ThinkerRecipe(),
    Objective.talker_sft: TalkerRecipe(Objective.talker_sft),
    Objective.talker_dpo: TalkerRecipe(Objective.talker_dpo),
}


def recipe(objective: Objective) -> Recipe:
    """The recipe of `stage.objective`."""
    return RECIPES[Objective(objective)]
