"""``lightning-compress fit``: LightningCLI with a compression recipe."""

from __future__ import annotations

import os
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, List, Mapping, Optional

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

    Args:
        trust_checkpoint_recipe: a resume without ``--recipe`` imports and calls the
            dotted paths of the checkpoint's stored recipe and honours its
            ``export.overwrite``; without it, they are refused and ignored.
    """

    def __init__(self, *args: Any, trust_checkpoint_recipe: bool = False, **kwargs: Any) -> None:
        self.trust_checkpoint_recipe = trust_checkpoint_recipe
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--recipe", type=Optional[str], default=None, help="compression recipe: a YAML path, or a ready recipe's name (int8_qat, qlora, ...)")
        parser.add_argument(
            "--override", type=List[str], default=[], help="recipe overrides KEY=VALUE; repeat the option for more"
        )

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the model's class and arguments from ``--ckpt_path``'s
        hyperparameters and imports and builds the class they name; a checkpoint is data,
        so that class must be the ``--model`` the user named, unless they trust it."""
        from lightning_compress.checkpoints import read_checkpoint
        from lightning_compress.commands.errors import CommandError
        from lightning_compress.core.filesystem import user_path

        subcommand = self.config.get("subcommand")
        settings = self.config.get(subcommand) if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings is not None else None
        if ckpt_path and user_path(ckpt_path, "ckpt_path").is_file():  # `~` expanded, as Lightning does
            # A file that is not a checkpoint fails here, in a sentence, not in Lightning's unpickling.
            checkpoint = read_checkpoint(ckpt_path, mmap=True)
            hyperparameters = checkpoint.get("hyper_parameters") or {}
            if not self.trust_checkpoint_recipe:
                self._check_checkpoint_classes(settings, ckpt_path, hyperparameters)
            if "pytorch-lightning_version" not in checkpoint:  # Lightning's restore raised a KeyError
                raise CommandError(
                    f"--ckpt_path {ckpt_path} is not a checkpoint Lightning wrote (no 'pytorch-lightning_version'; a"
                    " torch.save of a state dict?): resume from one a Trainer saved, or start a new run and load"
                    " these weights into the model yourself"
                )
            arguments = {k: v for k, v in hyperparameters.items() if k != "_instantiator"} if isinstance(
                hyperparameters, Mapping) else {}
            chosen = getattr(settings.get("model"), "class_path", None)
            if arguments and "_class_path" not in arguments and chosen:
                # Saved by a Trainer outside LightningCLI: `save_hyperparameters()` stored the
                # arguments but not the class, which LightningCLI then reads as the base
                # LightningModule's ("Option 'vocab_size' is not accepted"): they are --model's.
                model = {"class_path": chosen, "dict_kwargs": arguments}
                self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
                return
        super()._parse_ckpt_path()

    @staticmethod
    def _check_checkpoint_classes(settings: Any, ckpt_path: str, hyperparameters: Mapping[str, Any]) -> None:
        from lightning_compress.commands.errors import CommandError

        model = settings.get("model")
        chosen = getattr(model, "class_path", None) if model is not None else None
        stored = hyperparameters.get("_class_path")
        if stored is not None and stored != chosen:
            raise CommandError(
                f"the hyperparameters in {ckpt_path} name the model class {stored!r}, which would be imported and"
                f" built instead of --model {chosen!r}; a checkpoint is data: pass --model {stored} yourself if"
                " that is the class you mean, or --trust-checkpoint-recipe if you trust the file"
            )
        nested = [key for key, value in hyperparameters.items() if _names_a_class(value)]
        if nested:
            raise CommandError(
                f"the hyperparameters in {ckpt_path} hold class paths under {nested}, which would be imported and"
                " built; a checkpoint is data: pass these arguments yourself (--model.KEY), or"
                " --trust-checkpoint-recipe if you trust the file"
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
        from lightning_compress.callbacks.export import CompressedExport
        from lightning_compress.callbacks.recipe_record import recipe_in_checkpoint
        from lightning_compress.checkpoints import read_checkpoint_metadata
        from lightning_compress.commands.errors import CommandError
        from lightning_compress.formats.target import check_keeps_apart
        from lightning_compress.recipes import load_recipe

        recipe, overrides = config.get("recipe"), list(config.get("override") or [])
        if recipe is not None:
            callbacks = load_recipe(recipe, overrides).callbacks()
            files = {"the config file": os.fspath(path) for path in (config.get("config") or [])}
            if os.path.isfile(recipe):  # not a ready recipe's name
                files["the recipe file"] = recipe
            for callback in callbacks:
                if isinstance(callback, CompressedExport) and callback.overwrite:
                    check_keeps_apart(callback.dirpath, files, overwrite=True)
            return callbacks
        resume_from = config.get("ckpt_path")
        stored = None
        if resume_from not in (None, "last", "best", "hpc", "registry"):
            stored = recipe_in_checkpoint(read_checkpoint_metadata(resume_from))  # a distributed one's meta.pt too
        if stored is None:
            if overrides:
                raise CommandError("--override changes a recipe; pass --recipe too")
            return []
        print(f"lightning-compress: resuming with the recipe stored in {resume_from}")
        if self.trust_checkpoint_recipe:
            return load_recipe(stored, overrides).callbacks()
        # Data, not code: its dotted paths are refused (your --override keys excepted), and
        # it replaces nothing on disk unless you say so on this command line.
        _check_stored_paths(stored, overrides, resume_from)
        export = stored.get("export")
        if isinstance(export, Mapping) and export.get("overwrite", False) is not False:
            print(f"lightning-compress: the stored export.overwrite is ignored (set it with --override"
                  f" export.overwrite=true to replace {export.get('dirpath')})")
            overrides = ["export.overwrite=false", *overrides]
        return load_recipe(stored, overrides, trusted=False).callbacks()


# The recipe keys that name a directory the run writes to.
_WRITTEN_PATHS = (("export", "dirpath"), ("lora", "adapter_dir"), ("distillation", "cache_dir"))


def _check_stored_paths(stored: Mapping, overrides: List[str], checkpoint: Any) -> None:
    """A stored recipe chooses where the resumed run writes only inside the current
    directory: a checkpoint from elsewhere must not write anywhere else on the machine.

    Raises:
        CommandError: naming each key whose stored path is absolute outside the current
            directory, climbs out of it with ``..``, or is an interpolation (resolved only
            later), and the flags that choose the path instead.
    """
    from lightning_compress.commands.errors import CommandError

    chosen = {item.split("=", 1)[0].strip() for item in overrides}
    here = Path.cwd().resolve()
    outside = []
    for section, key in _WRITTEN_PATHS:
        values = stored.get(section)
        value = values.get(key) if isinstance(values, Mapping) else None
        if value is None or f"{section}.{key}" in chosen:
            continue
        text = str(value)
        if "${" in text or not (here / text).resolve().is_relative_to(here):
            outside.append(f"{section}.{key}={text!r}")
    if outside:
        first = outside[0].split("=", 1)[0]
        raise CommandError(
            f"the recipe stored in {checkpoint} writes outside the current directory ({', '.join(outside)}); a"
            f" checkpoint is data and does not choose where to write. Pass the path yourself (--override {first}=PATH,"
            " or --recipe), run from a directory that holds it, or pass --trust-checkpoint-recipe if you trust the file"
        )


def _names_a_class(value: Any) -> bool:
    """A jsonargparse ``class_path`` anywhere in a hyperparameter value."""
    if isinstance(value, Mapping):
        return "class_path" in value or any(_names_a_class(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_names_a_class(v) for v in value)
    return False


def _as_list(callbacks: Any) -> List[Callback]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def run_fit(argv: List[str], *, trust_checkpoint_recipe: bool = False) -> int:
    """Run ``fit`` with LightningCLI on ``argv``; print where the W&B run was written.

    ``trust_checkpoint_recipe``: see :class:`CompressionCLI`."""
    # sys.argv stays whole: Lightning's DDP launcher starts each other rank with it (a
    # truncated one ran `lightning-compress` with no arguments there). LightningCLI's
    # warning about both argv and `args` being set is about mistakes this is not.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = CompressionCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=["fit", *argv],
            trust_checkpoint_recipe=trust_checkpoint_recipe,
            parser_kwargs={"exit_on_error": False},
            # One config file per run, next to the others: a rerun never overwrites one (microseconds:
            # a short run and its resume can start within the same second).
            save_config_kwargs={"config_filename": f"config-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.yaml"},
        )
    from lightning.pytorch.loggers import WandbLogger

    from lightning_compress.core.tracking import wandb_run_dir

    for logger in cli.trainer.loggers:
        run_dir = wandb_run_dir(logger) if isinstance(logger, WandbLogger) else None  # CSV, TensorBoard: none
        if run_dir is not None:
            print(f"W&B run written to {run_dir}")
    return 0
