"""``lightning-compress fit``: LightningCLI with a compression recipe."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Any, List, Optional

# Lightning still calls jsonargparse APIs that warn about their own deprecation; a user of
# this command can do nothing about them.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI


class CompressionCLI(LightningCLI):
    """``LightningCLI`` plus ``--recipe`` and ``--override``.

    Everything LightningCLI takes still works (``--model``, ``--data``, ``--trainer.*``,
    ``--config``, ``--ckpt_path``); the recipe's callbacks join any ``--trainer.callbacks``.
    Without ``--trainer.logger``, runs are tracked with Weights & Biases (offline when
    no API key is set, see :func:`lightning_compress.core.tracking.wandb_logger`).
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--recipe", type=Optional[str], default=None, help="compression recipe: a YAML path, or a ready recipe's name (int8_qat, qlora, ...)")
        parser.add_argument(
            "--override", type=List[str], default=[], help="recipe overrides KEY=VALUE; repeat the option for more"
        )

    def instantiate_trainer(self, **kwargs: Any):
        from lightning_compress.callbacks.base import CompressionCallback
        from lightning_compress.commands.errors import CommandError
        from lightning_compress.commands.state import MarkTrainingStarted
        from lightning_compress.core.tracking import wandb_logger

        config = self.config_init[self.subcommand]
        trainer_config = config.get("trainer") or {}
        recipe_callbacks = self._recipe_callbacks(config)
        user_callbacks = _as_list(trainer_config.get("callbacks"))
        # One method configured twice (the same section), whatever the classes (a subclass counts).
        sections = {c.section for c in recipe_callbacks if isinstance(c, CompressionCallback)}
        clashes = sorted({type(c).__name__ for c in user_callbacks if isinstance(c, CompressionCallback) and c.section in sections})
        if clashes:
            raise CommandError(
                f"{clashes} come both from --trainer.callbacks and from the recipe; configure each method in"
                " one place (remove it from --trainer.callbacks, or its section from the recipe)"
            )
        kwargs["callbacks"] = [*user_callbacks, *recipe_callbacks, MarkTrainingStarted()]
        if trainer_config.get("logger") is None:
            kwargs["logger"] = wandb_logger(save_dir=trainer_config.get("default_root_dir") or ".")
        return super().instantiate_trainer(**kwargs)

    def _recipe_callbacks(self, config: Any) -> List[Callback]:
        """The recipe's callbacks; a resume without --recipe uses the one its checkpoint stores."""
        from lightning_compress.callbacks.recipe_record import recipe_in_checkpoint
        from lightning_compress.checkpoints import read_checkpoint
        from lightning_compress.commands.errors import CommandError
        from lightning_compress.recipes import load_recipe

        recipe, overrides = config.get("recipe"), list(config.get("override") or [])
        resume_from = config.get("ckpt_path")
        if recipe is None and resume_from not in (None, "last", "best", "hpc", "registry"):
            recipe = recipe_in_checkpoint(read_checkpoint(resume_from))
            if recipe is not None:
                print(f"lightning-compress: resuming with the recipe stored in {resume_from}")
        if recipe is None and overrides:
            raise CommandError("--override changes a recipe; pass --recipe too")
        return load_recipe(recipe, overrides).callbacks() if recipe is not None else []


def _as_list(callbacks: Any) -> List[Callback]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def run_fit(argv: List[str]) -> int:
    """Run ``fit`` with LightningCLI on ``argv``; print where the W&B run was written."""
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both argv and args are set
    try:
        cli = CompressionCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=["fit", *argv],
            parser_kwargs={"exit_on_error": False},
            # One config file per run, next to the others: a rerun never overwrites one (microseconds:
            # a short run and its resume can start within the same second).
            save_config_kwargs={"config_filename": f"config-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.yaml"},
        )
    finally:
        sys.argv = saved
    from lightning_compress.core.tracking import wandb_run_dir

    for logger in cli.trainer.loggers:
        run_dir = wandb_run_dir(logger)
        if run_dir is not None:
            print(f"W&B run written to {run_dir}")
    return 0
