"""Rebuild a compressed model from a Lightning checkpoint, outside a training run.

Inside Lightning the usual way works: ``Trainer(callbacks=from_recipe(r)).test(model,
ckpt_path=...)``. These helpers are for the export step of ``lightning-compress``, and for
anyone who wants the compressed module in hand without a Trainer loop.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_compress.callbacks.export import CompressedExport
from lightning_compress.callbacks.hooks import run_queued_only
from lightning_compress.callbacks.recipe_record import RecipeRecord, recipe_in_checkpoint
from lightning_compress.core.batches import as_steps_get_them
from lightning_compress.core.filesystem import distributed_checkpoint_problem, user_path
from lightning_compress.formats.export import ExportReport
from lightning_compress.formats.target import first_held
from lightning_compress.recipes import Recipe, RecipeError, load_recipe

# Sections that do not change the student's weights, so a rebuilt model does without them.
_NOT_NEEDED_TO_REBUILD = ("distillation", "export")


def read_checkpoint(path: Union[str, os.PathLike], mmap: bool = False) -> Dict[str, Any]:
    """Load a Lightning checkpoint without unpickling code (``weights_only=True``);
    ``mmap``: its tensors mapped from the file, not read (to check a checkpoint that
    Lightning loads next; a file in the legacy format is read).

    Raises:
        FileNotFoundError: when there is no such file.
        RecipeError: when the file is not a checkpoint that loads safely.
    """
    path = user_path(path, "checkpoint")
    if path.is_dir():
        raise RecipeError(distributed_checkpoint_problem(path)
                          or f"checkpoint {str(path)!r} is a directory; pass the checkpoint file (a .ckpt) in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        mapped = mmap and zipfile.is_zipfile(path)  # mmap needs torch.save's zip format
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as err:
        raise RecipeError(
            f"checkpoint {str(path)!r} cannot be loaded with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); is it a Lightning checkpoint?"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise RecipeError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def read_checkpoint_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """What a checkpoint holds besides the weights and optimizer states (the recipe, the
    callbacks' state, the hyperparameters): from the file, or from ``meta.pt`` in the
    folder of a distributed checkpoint (``ModelParallelStrategy``'s default), where
    Lightning keeps them.

    Raises:
        FileNotFoundError, RecipeError: as :func:`read_checkpoint`.
    """
    folder = user_path(path, "checkpoint")
    if distributed_checkpoint_problem(folder) is None:
        return read_checkpoint(path, mmap=True)
    try:
        return dict(torch.load(folder / "meta.pt", map_location="cpu", weights_only=True))
    except Exception as err:
        raise RecipeError(f"the distributed checkpoint {str(folder)!r} has no readable meta.pt ({type(err).__name__}:"
                          f" {str(err).splitlines()[0] if str(err) else ''})") from None


def load_weights(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """``model.load_state_dict`` of the checkpoint's weights.

    Raises:
        RecipeError: they do not fit ``model`` (missing or unexpected keys, other shapes),
            naming its class and the first differences.
    """
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        if not str(err).startswith("Error(s) in loading state_dict"):
            raise  # not a mismatch (a load hook's own error, out of memory): as it is
        # torch's message: a first line, then one line per kind of mismatch
        details = "; ".join(line.strip() for line in str(err).splitlines()[1:4] if line.strip())
        details = details if len(details) <= 600 else details[:600].rsplit(",", 1)[0] + ", ..."
        raise RecipeError(
            f"the checkpoint's weights do not fit {type(model).__name__} ({details}); pass the model class"
            " (--model) the run was trained with, built with the same hyperparameters"
        ) from None


def restore_from_checkpoint(
    model: pl.LightningModule, checkpoint: Mapping[str, Any], recipe: Recipe
) -> pl.LightningModule:
    """Put ``model`` in the compressed state ``checkpoint`` holds: masks, quantizers,
    adapters (NF4 bases included), in Lightning's own restore order: callbacks set up,
    the module's ``configure_model`` and ``on_load_checkpoint``, its weights, then the
    callbacks' ``on_load_checkpoint`` and state.

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
    checkpoint = dict(checkpoint)  # on_load_checkpoint hooks may add to it (LoRA puts NF4 bases back)
    for callback in callbacks:
        callback.setup(trainer, model, stage="validate")
    configure_model(model)
    model.on_load_checkpoint(checkpoint)
    load_weights(model, checkpoint)
    for callback in callbacks:
        callback.on_load_checkpoint(trainer, model, checkpoint)
        callback.load_state_dict(states[callback.state_key])
    model.eval()
    return model


def configure_model(model: pl.LightningModule) -> None:
    """The module's ``configure_model``, as ``Trainer.validate`` calls it (after the
    callbacks' ``setup``, when there are callbacks): layers built there hold checkpoint
    weights, and callbacks queued work after it (LoRA adapts a module that has one only
    then). On this one process there is no device mesh: a ``configure_model`` that fails
    without one (it shards, as under ``ModelParallelStrategy``) is skipped with a warning,
    and only the callbacks' queued work runs."""
    if not is_overridden("configure_model", model):
        return
    try:
        type(model).configure_model(model)  # the module's own; the callbacks' queued work below, outside the try
    except Exception as err:
        if model.device_mesh is not None:
            raise
        warnings.warn(f"{type(model).__name__}.configure_model failed on this one process, which has no device mesh"
                      f" ({type(err).__name__}: {err}); it was skipped, as sharding is: layers it builds are missing"
                      " (let it return when `self.device_mesh` is None to skip it quietly)", UserWarning, stacklevel=2)
    run_queued_only(model)


def export_checkpoint(
    checkpoint_path: Union[str, os.PathLike],
    model_class: type,
    *,
    recipe: Union[str, os.PathLike, Mapping[str, Any], None] = None,
    overrides: Sequence[str] = (),
    output: Union[str, os.PathLike, None] = None,
    datamodule: Optional[pl.LightningDataModule] = None,
    overwrite: bool = False,
    trust_recipe: bool = False,
) -> ExportReport:
    """Export a compression run's checkpoint to a packed directory, as the run's own
    ``CompressedExport`` would have (same ``module`` and options).

    What the checkpoint holds is data: its stored recipe never decides where to write or
    whether to replace anything, and a dotted path in it (``export.input_fn``) is refused
    rather than imported, unless you pass the recipe again or set ``trust_recipe``.

    Args:
        checkpoint_path: the Lightning checkpoint.
        model_class: the LightningModule class; built from the checkpoint's saved
            hyperparameters (``save_hyperparameters()``), or with no arguments.
        recipe: the recipe the run used; default: the one stored in the checkpoint.
        overrides: recipe overrides (``"export.backend=dequantize"``).
        output: the directory to write; required with the stored recipe, else the
            default is your ``recipe``'s ``export.dirpath``.
        datamodule: when given, its validation (else training) batches feed the output
            parity check; without it only the weights are checked.
        overwrite: replace an existing directory (an ``export.overwrite`` in the recipe
            is ignored: only this argument replaces anything).
        trust_recipe: import and call the dotted paths of the stored recipe
            (``export.input_fn``) as if you had passed it yourself.

    Raises:
        RecipeError: for a checkpoint without a recipe (and no ``recipe``), no output
            directory, a stored dotted path without ``trust_recipe``, or a bad recipe.
        FileExistsError: when the output directory exists and ``overwrite`` is False, or
            (with ``overwrite``) holds the checkpoint or the recipe file it reads; checked
            before the model is rebuilt, nothing is written.
    """
    if not (isinstance(model_class, type) and issubclass(model_class, pl.LightningModule)):
        raise RecipeError(f"--model must be a LightningModule class, got {model_class!r}")
    checkpoint = read_checkpoint(checkpoint_path)
    stored = recipe is None
    if stored:
        recipe = recipe_in_checkpoint(checkpoint)
        if recipe is None:
            raise RecipeError(
                f"{str(checkpoint_path)!r} stores no recipe (it was not trained with from_recipe); pass --recipe"
            )
        if output is None:
            raise RecipeError(
                "no output directory: pass -o/--output (output= in Python); the recipe stored in"
                f" {str(checkpoint_path)!r} does not choose where to write"
            )
    changes = [*overrides]
    if output is not None:
        changes.append(f"export.dirpath={json.dumps(str(output))}")
    # The teacher is not needed to rebuild the student; its checkpoint may be gone.
    options = dict(exclude=["distillation"], trusted=trust_recipe or not stored)
    loaded = load_recipe(recipe, changes, **options)
    writers = [c for c in loaded.callbacks() if isinstance(c, CompressedExport)]
    if not writers:
        raise RecipeError("no output directory: pass -o/--output or add an export section with a dirpath to the recipe")
    if writers[0].config.overwrite is not bool(overwrite):  # only the caller replaces anything
        loaded = load_recipe(recipe, [*changes, f"export.overwrite={str(bool(overwrite)).lower()}"], **options)
        writers = [c for c in loaded.callbacks() if isinstance(c, CompressedExport)]
    (writer,) = writers
    read = {"the checkpoint this export reads": checkpoint_path, **(
        {"the recipe file": recipe} if isinstance(recipe, (str, os.PathLike)) and user_path(recipe, "recipe").is_file()
        else {})}
    if writer.config.overwrite and (held := first_held(writer.dirpath, read)) is not None:  # it is replaced whole
        raise FileExistsError(
            f"{writer.dirpath} holds {held[0]} ({held[1]}), which overwrite (on the command line: --overwrite) would"
            " delete with the folder it replaces: choose another output directory (-o/--output), or move it out"
            " first; nothing was written"
        )
    if writer.dirpath.exists() and not writer.dirpath.is_dir():  # --overwrite would not help: say so now
        raise FileExistsError(
            f"{writer.dirpath} is a file, not a directory; the export writes a directory and never replaces a file"
            " (overwrite replaces only a directory): choose another output directory, or move the file away;"
            " nothing was written"
        )
    if writer.dirpath.exists() and not writer.config.overwrite:  # before the model is rebuilt
        raise FileExistsError(
            f"{writer.dirpath} already exists; choose another output directory or pass overwrite=True"
            " (on the command line: --overwrite) to replace it; nothing was written"
        )
    model = restore_from_checkpoint(build_from_hyperparameters(model_class, checkpoint.get("hyper_parameters")), checkpoint, loaded)
    return writer.write(model, as_steps_get_them(evaluation_batches(datamodule), model, datamodule)
                        if datamodule is not None else ())


def build_from_hyperparameters(cls: type, saved: Any, what: str = "hyperparameters", *,
                               checkpoint: bool = True) -> Any:
    """``cls(**saved)``: a LightningModule or LightningDataModule rebuilt from the
    hyperparameters a checkpoint holds (``what`` names them in the error); without a
    ``checkpoint``, ``cls()``.

    Raises:
        RecipeError: when they do not fit ``cls``'s ``__init__``.
    """
    # LightningCLI adds its own keys (`_class_path`, `_instantiator`) next to the module's.
    hyperparameters = {k: v for k, v in (saved or {}).items() if not str(k).startswith("_")}
    try:
        return cls(**hyperparameters)
    except TypeError as err:
        if not checkpoint:
            raise RecipeError(f"cannot build {cls.__name__} without arguments: {err}; give it defaults, or pass a"
                              " --checkpoint whose hyperparameters (save_hyperparameters()) build it") from None
        raise RecipeError(
            f"cannot build {cls.__name__} from the checkpoint's {what} {sorted(hyperparameters)}:"
            f" {err}; is the checkpoint one of {cls.__name__}'s (pass the class it was saved from)? If so, call"
            " save_hyperparameters() in its __init__"
        ) from None


def evaluation_batches(datamodule: pl.LightningDataModule):
    """The datamodule's validation batches, or its training batches when it has none
    (with a warning: figures on training batches read better than held-out ones)."""
    datamodule.prepare_data()
    datamodule.setup("validate")
    if is_overridden("val_dataloader", datamodule, pl.LightningDataModule):
        return iter(datamodule.val_dataloader())
    warnings.warn(f"{type(datamodule).__name__} has no val_dataloader: its training batches are used instead",
                  UserWarning, stacklevel=2)
    datamodule.setup("fit")
    return iter(datamodule.train_dataloader())
