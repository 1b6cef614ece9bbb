"""``lightning-compress sensitivity``: per-layer sensitivity table, CSV, plot, and a
mixed-precision recipe for a bit budget.

    lightning-compress sensitivity --model pkg.Module [--checkpoint last.ckpt] [--data pkg.DataModule] \\
        [--batches 8] [--bits 8 4 3] [--sparsity 0.5 0.75] [--group-size 32] [--reference loss|kl] \\
        [--targets GLOB ...] [--exclude GLOB ...] [--budget-bits 4.0] [-o sensitivity] [--overwrite] [--wandb]

The model is built as ``export`` builds it: ``--model`` from the checkpoint's saved
hyperparameters with its weights loaded (read with ``weights_only=True``), or with no
arguments without ``--checkpoint`` (a module that loads its pretrained weights itself).
Batches are the first ``--batches`` of ``--data``'s validation loader (its training
loader when it has none; built from the checkpoint's datamodule hyperparameters), or of
the model's own ``val_dataloader``.
"""

from __future__ import annotations

import argparse
import itertools
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, List, Mapping, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_compress.commands.errors import CommandError
from lightning_compress.core.filesystem import user_path

CSV_NAME, PLOT_NAME, RECIPE_NAME = "sensitivity.csv", "sensitivity.png", "mixed_precision.yaml"
_CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class _Parser(argparse.ArgumentParser):
    """argparse that raises (one paragraph, exit code 2) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CommandError(f"{message} (see --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lightning-compress sensitivity",
                description="Measure each layer's loss increase when quantized (or pruned) alone; optionally choose"
                            " bits per layer for an average-bits budget and write the QAT recipe.")
    p.add_argument("--model", required=True, help="the LightningModule class, as a dotted import path")
    p.add_argument("--checkpoint", help="a Lightning checkpoint of the trained float model (default: --model built"
                                        " with no arguments)")
    p.add_argument("--data", help="a LightningDataModule class path: its validation batches, or its training batches"
                                  " (with a warning) when it has none (default: the model's own val_dataloader)")
    p.add_argument("--batches", type=int, default=8, help="how many batches to evaluate each case on (default 8)")
    p.add_argument("--bits", nargs="+", default=["8", "4", "3"], help="candidate bit widths, 2..8 (default 8 4 3)")
    p.add_argument("--sparsity", nargs="+", type=float, default=[], help="candidate sparsities in (0, 1) (default none)")
    p.add_argument("--group-size", type=int, help="QAT group size (default: one scale per output channel)")
    p.add_argument("--reference", default="loss", help="'loss' (training_step's loss) or 'kl' (KL to the float outputs)")
    p.add_argument("--targets", nargs="+", help="layer name globs or layer classes (torch.nn.Embedding)")
    p.add_argument("--exclude", nargs="+", help="layer name globs or layer classes to leave out")
    p.add_argument("--budget-bits", type=float, help=f"average bits per weight: also write {RECIPE_NAME}")
    p.add_argument("-o", "--output", default="sensitivity", help="directory to write to (default: sensitivity)")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier run in --output")
    p.add_argument("--wandb", action="store_true", help="also log the table to Weights & Biases (offline unless set up)")
    return p


def run_sensitivity(argv: List[str]) -> int:
    """Run the command on ``argv``; returns the exit code.

    Raises:
        CommandError: bad options, an unknown class path, no batches, files in the way.
    """
    args = parser().parse_args(argv)
    from lightning_compress.sensitivity import (
        allocate_bits,
        check_bits,
        check_budget,
        layer_sensitivity,
        recipe_from_allocation,
    )

    output = user_path(args.output, "-o")
    # All three, whether written this time or not: an earlier run's plot or recipe kept beside
    # this run's table would describe other measurements.
    written = [output / CSV_NAME, output / PLOT_NAME, output / RECIPE_NAME]
    existing = [str(path) for path in written if path.exists()]
    if existing and not args.overwrite:  # before any work
        raise CommandError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite to"
                           " replace them, or another -o")
    if args.batches < 1:
        raise CommandError(f"--batches must be a positive int, got {args.batches}")
    candidate_bits = check_bits([_bits(b) for b in args.bits])
    if args.budget_bits is not None:  # before the measurement, which may take hours
        check_budget(args.budget_bits, candidate_bits)
    model, checkpoint = _model(args.model, args.checkpoint)
    batches = list(itertools.islice(_loader(model, args.data, checkpoint), args.batches))
    if not batches:
        raise CommandError("the data gave no batches; check --data (its validation set may be empty)")
    made = not output.exists()
    _check_writable(output)  # before the measurement, once nothing else can fail first
    try:
        report = layer_sensitivity(
            model, batches, bits=candidate_bits, sparsities=args.sparsity, group_size=args.group_size,
            targets=_targets(args.targets), exclude=_targets(args.exclude), reference=args.reference,
        )
    except BaseException:
        if made and not any(output.iterdir()):  # no empty -o folder left by a refusal or an interruption
            output.rmdir()
        raise
    print(report.table())
    for earlier in (PLOT_NAME, RECIPE_NAME):  # an earlier run's (--overwrite): not beside this table, whatever fails next
        (output / earlier).unlink(missing_ok=True)
    print(f"wrote {report.write_csv(output / CSV_NAME)}")  # kept whatever the budget's choice says
    if report.plot(output / PLOT_NAME):
        print(f"wrote {output / PLOT_NAME}")
    else:
        print(f"{PLOT_NAME} not written: matplotlib is not installed (pip install matplotlib)")
    recipe = None
    if args.budget_bits is not None:
        allocation = allocate_bits(report, args.budget_bits)
        recipe = recipe_from_allocation(report, allocation)
        _write_recipe(report, allocation, recipe, args.budget_bits, output / RECIPE_NAME)
    if args.wandb:
        _log_to_wandb(report, recipe, output)
    return 0


def _check_writable(output: Path) -> None:
    """Make ``-o`` (with its parents) and check a file can be made in it, so a path that
    cannot be written stops the command before the measurement, not after.

    Raises:
        CommandError: naming ``-o``: it is a file, or it cannot be made or written.
    """
    if output.exists() and not output.is_dir():
        raise CommandError(f"-o {output} is a file, not a directory; pass a directory to write the results to"
                           " (it is made if missing)")
    try:
        output.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output).close()
    except OSError as error:
        raise CommandError(f"-o {output} cannot be written ({error.strerror or error}); pass a directory you can"
                           " write to") from None


def _write_recipe(report: Any, allocation: Any, recipe: Mapping[str, Any], budget: float, path: Path) -> None:
    from omegaconf import OmegaConf

    from lightning_compress.core.atomic import atomic_write_bytes

    summary = (f"average {allocation.average_bits:.3f} bits per weight (budget {budget:g}), estimated"
               f" {'loss increase' if report.reference == 'loss' else 'KL'} {allocation.estimated_delta:+.4g}"
               + ("" if allocation.exact else " (near-optimal: the search was thinned, see sensitivity.budget)"))
    header = ("# Mixed-precision QAT from `lightning-compress sensitivity`: each layer's bits chosen for the least\n"
              f"# summed per-layer delta within the budget; {summary}.\n")
    atomic_write_bytes(path, (header + OmegaConf.to_yaml(OmegaConf.create(dict(recipe)))).encode())
    print(f"mixed precision: {summary}")
    print(f"wrote {path} (use it with --recipe {path}, or from_recipe({str(path)!r}))")


def _log_to_wandb(report: Any, recipe: Optional[Mapping[str, Any]], output: Path) -> None:
    from lightning_compress.core.tracking import wandb_logger, wandb_run_dir

    logger = wandb_logger(save_dir=output, job_type="sensitivity")
    if recipe is not None:
        logger.log_hyperparams({"compression_recipe": dict(recipe)})
    report.log(logger)
    run_dir = wandb_run_dir(logger)
    logger.experiment.finish()
    if run_dir is not None:
        print(f"W&B run written to {run_dir}")


def _import(path: str, option: str) -> Any:
    from lightning_compress.recipe_types import ImportPathError, import_object

    try:
        return import_object(path)
    except ImportPathError as err:
        raise CommandError(f"{option} {path}: unknown class path: {err}") from None


def _model(path: str, checkpoint_path: Optional[str]):
    from lightning_compress.checkpoints import build_from_hyperparameters, configure_model, load_weights, read_checkpoint
    from lightning_compress.recipes import RecipeError

    model_class = _import(path, "--model")
    if not (isinstance(model_class, type) and issubclass(model_class, pl.LightningModule)):
        raise CommandError(f"--model must be a LightningModule class, got {path}")
    checkpoint = {}
    if checkpoint_path is not None:
        checkpoint = read_checkpoint(checkpoint_path)
        _warn_of_compression(checkpoint)
    try:
        model = build_from_hyperparameters(model_class, checkpoint.get("hyper_parameters"), checkpoint=bool(checkpoint))
    except RecipeError as err:
        raise CommandError(f"--model {path}: {err}") from None
    configure_model(model)  # as Trainer.validate calls it: layers built there are measured (and hold weights)
    if checkpoint:
        model.on_load_checkpoint(checkpoint)
        load_weights(model, checkpoint)
    return model, checkpoint


def _warn_of_compression(checkpoint: Mapping[str, Any]) -> None:
    """A checkpoint trained with QAT or pruning holds float, dense weights beside the
    quantizer and mask state this command does not apply: say what it measures."""
    states = checkpoint.get("callbacks")
    held = sorted({key.partition("{")[0] for key in states or {} if isinstance(key, str)}
                  & {"QuantizationAwareTraining", "MagnitudePruning"}) if isinstance(states, Mapping) else []
    if held:
        warnings.warn(
            f"the checkpoint was trained with {' and '.join(held)}: sensitivity measures its weights as a float,"
            " dense model (the quantization and masks it trained with are not applied), so the table's float"
            " reference is those weights; to choose bits for a QAT run, measure the float checkpoint it starts from",
            UserWarning, stacklevel=3,
        )


def _loader(model: pl.LightningModule, data: Optional[str], checkpoint: Mapping[str, Any]):
    from lightning_compress.checkpoints import build_from_hyperparameters, evaluation_batches
    from lightning_compress.core.batches import as_steps_get_them
    from lightning_compress.recipes import RecipeError

    if data is None:
        if is_overridden("val_dataloader", model, pl.LightningModule):
            return as_steps_get_them(iter(model.val_dataloader()), model)
        raise CommandError("no batches: pass --data my_pkg.MyDataModule (or give the model a val_dataloader)")
    data_class = _import(data, "--data")
    if not (isinstance(data_class, type) and issubclass(data_class, pl.LightningDataModule)):
        raise CommandError(f"--data must be a LightningDataModule class, got {data}")
    try:
        datamodule = build_from_hyperparameters(data_class, checkpoint.get("datamodule_hyper_parameters"),
                                                "datamodule hyperparameters", checkpoint=bool(checkpoint))
    except RecipeError as err:
        raise CommandError(f"--data {data}: {err}") from None
    return as_steps_get_them(evaluation_batches(datamodule), model, datamodule)


def _bits(text: str) -> Any:
    return int(text) if text.isdigit() else text  # "int4" is checked by layer_sensitivity


def _targets(values: Optional[List[str]]) -> Optional[List[Any]]:
    """Globs as they are; a dotted path that imports to a layer class is that class."""
    if values is None:
        return None
    from torch import nn

    from lightning_compress.recipe_types import ImportPathError, import_object

    out: List[Any] = []
    for value in values:
        target: Any = value
        if _CLASS_PATH.fullmatch(value):
            try:
                found = import_object(value)
            except ImportPathError:
                found = None
            if isinstance(found, type) and issubclass(found, nn.Module):
                target = found
        out.append(target)
    return out


__all__ = ["run_sensitivity", "parser", "CSV_NAME", "PLOT_NAME", "RECIPE_NAME"]
