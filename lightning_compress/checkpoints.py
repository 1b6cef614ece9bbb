"""Rebuild a compressed model from a Lightning checkpoint, outside a training run.

Inside Lightning the usual way works: ``Trainer(callbacks=from_recipe(r)).test(model,
ckpt_path=...)``. These helpers are for the export step of ``lightning-compress``, and for
anyone who wants the compressed module in hand without a Trainer loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch

from lightning_compress.callbacks.recipe_record import RecipeRecord, recipe_in_checkpoint
from lightning_compress.formats.export import ExportReport, export
from lightning_compress.recipes import Recipe, RecipeError, load_recipe

# Sections that do not change the student's weights, so a rebuilt model does without them.
_NOT_NEEDED_TO_REBUILD = ("distillation", "export")


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Load a Lightning checkpoint without unpickling code (``weights_only=True``).

    Raises:
        FileNotFoundError: when there is no such file.
        RecipeError: when the file is not a checkpoint that loads safely.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RecipeError(
            f"checkpoint {str(path)!r} cannot be loaded with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); is it a Lightning checkpoint?"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise RecipeError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def restore_from_checkpoint(
    model: pl.LightningModule, checkpoint: Mapping[str, Any], recipe: Recipe
) -> pl.LightningModule:
    """Put ``model`` in the compressed state ``checkpoint`` holds: masks, quantizers,
    adapters, in the same order Lightning restores them (callbacks set up, then model
    weights, then callback state).

    Raises:
        RecipeError: when the checkpoint has no state for a callback of the recipe.
    """
    callbacks = [c for c in recipe.callbacks(exclude=_NOT_NEEDED_TO_REBUILD) if not isinstance(c, RecipeRecord)]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    states = checkpoint.get("callbacks", {})
    missing = [type(c).__name__ for c in callbacks if c.state_key not in states]
    if missing:
        raise RecipeError(
            f"the checkpoint holds no state for {missing}; export with the recipe the run was trained with"
            f" (the checkpoint has {sorted(states)})"
        )
    for callback in callbacks:
        callback.setup(trainer, model, stage="validate")
    model.load_state_dict(checkpoint["state_dict"])
    for callback in callbacks:
        callback.load_state_dict(states[callback.state_key])
    model.eval()
    return model


def export_checkpoint(
    checkpoint_path: Union[str, os.PathLike],
    model_class: type,
    *,
    recipe: Union[str, os.PathLike, Mapping[str, Any], None] = None,
    overrides: Sequence[str] = (),
    output: Union[str, os.PathLike, None] = None,
    datamodule_class: Optional[type] = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export a compression run's checkpoint to a packed directory.

    Args:
        checkpoint_path: the Lightning checkpoint.
        model_class: the LightningModule class; built from the checkpoint's saved
            hyperparameters (``save_hyperparameters()``), or with no arguments.
        recipe: the recipe the run used; default: the one stored in the checkpoint.
        overrides: recipe overrides (``"export.backend=dequantize"``).
        output: the directory; default: the recipe's ``export.dirpath``.
        datamodule_class: when given, its validation (else training) batches feed the
            output parity check; without it only the weights are checked.
        overwrite: replace an existing directory.
    """
    if not (isinstance(model_class, type) and issubclass(model_class, pl.LightningModule)):
        raise RecipeError(f"--model must be a LightningModule class, got {model_class!r}")
    checkpoint = read_checkpoint(checkpoint_path)
    if recipe is None:
        recipe = recipe_in_checkpoint(checkpoint)
        if recipe is None:
            raise RecipeError(
                f"{str(checkpoint_path)!r} stores no recipe (it was not trained with from_recipe); pass --recipe"
            )
    # The teacher is not needed to rebuild the student; its checkpoint may be gone.
    loaded = load_recipe(recipe, list(overrides), exclude=["distillation"])
    options = dict(loaded.config.get("export", {}))
    out_dir = output if output is not None else options.pop("dirpath", None)
    options.pop("dirpath", None)
    if out_dir is None:
        raise RecipeError("no output directory: pass -o/--output or set export.dirpath in the recipe")
    for callback_only in ("module", "parity_batches", "input_fn"):
        options.pop(callback_only, None)
    model = _build(model_class, checkpoint)
    restore_from_checkpoint(model, checkpoint, loaded)
    inputs = _parity_inputs(datamodule_class, loaded) if datamodule_class is not None else None
    options["overwrite"] = overwrite or options.get("overwrite", False)
    return export(model, out_dir, inputs=inputs, recipe=loaded.config, **options)


def _build(model_class: type, checkpoint: Mapping[str, Any]) -> pl.LightningModule:
    # LightningCLI adds its own keys (`_class_path`, `_instantiator`) next to the module's.
    hyperparameters = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    try:
        return model_class(**hyperparameters)
    except TypeError as err:
        raise RecipeError(
            f"cannot build {model_class.__name__} from the checkpoint's hyperparameters {sorted(hyperparameters)}:"
            f" {err}; call save_hyperparameters() in its __init__"
        ) from None


def _parity_inputs(datamodule_class: type, recipe: Recipe) -> list:
    from lightning_compress.callbacks.export import default_input_fn

    datamodule = datamodule_class()
    datamodule.prepare_data()
    datamodule.setup("validate")
    try:
        loader = datamodule.val_dataloader()
    except Exception:  # a datamodule without validation data
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
    batches = int(recipe.config.get("export", {}).get("parity_batches", 2))
    inputs = []
    for batch in loader:
        inputs.append(default_input_fn(batch))
        if len(inputs) == batches:
            break
    return inputs
