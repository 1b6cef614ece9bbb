"""RecipeRecord: keeps the resolved recipe with the run."""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_compress.core.state import RECIPE_CHECKPOINT_KEY, recipe_in_checkpoint
from lightning_compress.version import __version__


class RecipeRecord(Callback):
    """Store the resolved recipe in every checkpoint and log it to the experiment config.

    :func:`lightning_compress.from_recipe` appends one to the callbacks it returns; there
    is no need to add it by hand. The recipe lands in ``checkpoint["lightning_compress"]
    ["recipe"]`` (read it back with :func:`recipe_in_checkpoint`, or let
    ``lightning-compress export`` use it) and under ``compression_recipe`` in every
    logger's hyperparameters (W&B config, CSV/TensorBoard ``hparams``).

    Args:
        recipe: the resolved recipe, plain values only.
    """

    def __init__(self, recipe: Mapping[str, Any]) -> None:
        if not isinstance(recipe, Mapping):
            raise ValueError(f"`recipe` must be a mapping (the resolved recipe), got {type(recipe).__name__}")
        self.recipe: Dict[str, Any] = copy.deepcopy(dict(recipe))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            for logger in trainer.loggers:
                logger.log_hyperparams({"compression_recipe": self.recipe})

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        checkpoint[RECIPE_CHECKPOINT_KEY] = {"recipe": copy.deepcopy(self.recipe), "version": __version__}


__all__ = ["RecipeRecord", "recipe_in_checkpoint"]
