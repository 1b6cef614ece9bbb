"""``lightning-compress``: fit, export, inspect, recipes, sensitivity and demo from the command line.

    lightning-compress fit --recipe r.yaml --model pkg.Module [--data pkg.DataModule] \\
        [--trainer.max_epochs 3] [--override pruning.final_sparsity=0.8 ...]
    lightning-compress export --checkpoint last.ckpt --model pkg.Module -o packed/ [--recipe r.yaml] [--overwrite] \\
        [--format gguf] [--format onnx]
    lightning-compress inspect packed/ [--verify]   (or a checkpoint; --verify checks the weights' checksum)
    lightning-compress recipes [NAME]          (the ready recipes; NAME prints one to copy)
    lightning-compress sensitivity --model pkg.Module [--checkpoint last.ckpt] [--data pkg.DataModule] \\
        [--bits 8 4 3] [--group-size 32] [--budget-bits 4.0] [-o sensitivity]   (per-layer table, csv, recipe)
    lightning-compress demo

Bad input (a missing file, a bad recipe, an unknown class path) ends with a one-paragraph
error on stderr and exit code 2. A checkpoint's stored recipe is data: nothing in it is
imported or called (``fit --ckpt_path`` and ``export`` refuse its dotted paths unless
--recipe is passed again or --trust-checkpoint-recipe), and it never chooses where
``export`` writes.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lightning_compress.commands.errors import CommandError
from lightning_compress.core.notes import add_note

USAGE_ERROR = 2
COMMANDS = ("fit", "export", "inspect", "recipes", "sensitivity", "demo")
# A checkpoint's stored recipe is data; this flag lets its dotted paths be imported and called.
TRUST_FLAG = "--trust-checkpoint-recipe"


def _import_from_the_working_directory() -> None:
    """``--model my_model.Net`` finds ``./my_model.py``, as under ``python -m`` or a
    LightningCLI script of one's own (a console script has its own folder on the path
    instead); appended last, so the directory shadows no installed package."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lightning-compress`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else USAGE_ERROR
    command, rest = argv[0], argv[1:]
    handlers: Dict[str, Callable[[List[str]], int]] = {
        "fit": _fit,
        "export": _export,
        "inspect": _inspect,
        "recipes": _recipes,
        "sensitivity": _sensitivity,
        "demo": _demo,
    }
    if command not in handlers and command.startswith("-"):
        named = next((word for word in rest if word in handlers), None)
        where = (f"`lightning-compress {named} {command} ...`" if named else
                 f"`lightning-compress COMMAND {command} ...`, with COMMAND one of {', '.join(COMMANDS)}")
        return _fail("lightning-compress", f"{command} comes before the command; options go after it: {where}")
    if command not in handlers:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return _fail("lightning-compress", f"unknown command {command!r}; {hint}commands are {', '.join(COMMANDS)}")
    from lightning_compress.commands import state

    if command in ("fit", "export", "sensitivity"):  # the commands that import the user's classes
        _import_from_the_working_directory()
    state.reset()
    try:
        return handlers[command](rest)
    except Exception as err:
        if not _is_user_error(err):
            raise
        return _fail(f"lightning-compress {command}", _with_notes(err))
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Destroy the process group a distributed run left (its ranks each run this command)
    while the interpreter is whole: Lightning leaves it to an atexit hook, during shutdown,
    where a rank of a finished ``ModelParallelStrategy`` fit in this suite aborted with
    "terminate called without an active exception" (exit -6). No barrier: a rank that
    failed after the last collective would leave the others waiting in it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_user_error(err: BaseException) -> bool:
    """Errors that describe bad input, not a failure of the library.

    The callbacks validate their settings against the model before the first training
    step (a group size that does not divide a layer, a target that matches nothing, an
    export directory that exists, a checkpoint trained with other settings) and raise
    ValueError, TypeError or FileExistsError; once training has started, the same types
    are real failures and keep their traceback.
    """
    from lightning_compress.callbacks.export import DRY_EXPORT_NOTE
    from lightning_compress.commands.state import training_started
    from lightning_compress.core.validate import ArgumentError
    from lightning_compress.formats.errors import ExportError, PackedFormatError, ParityError
    from lightning_compress.recipes import RecipeError

    explicit = (CommandError, RecipeError, PackedFormatError, ExportError, ParityError, FileNotFoundError, argparse.ArgumentError)
    before = (ValueError, TypeError, FileExistsError, IsADirectoryError)  # IsADirectoryError: a --ckpt_path folder
    # The export's dry run checks its settings (`input_fn`) at the first batch, after
    # `on_train_start` but before any step; an error the model itself raises there keeps its traceback.
    dry_run = isinstance(err, ArgumentError) and DRY_EXPORT_NOTE in getattr(err, "__notes__", ())
    return isinstance(err, explicit) or dry_run or (
        isinstance(err, before) or _weights_of_another_model(err)) and not training_started()


def _weights_of_another_model(err: BaseException) -> bool:
    """torch's error for a checkpoint whose weights do not fit the model (Lightning's
    restore of ``--ckpt_path``), given a note saying what to pass."""
    if not (isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict")):
        return False
    if not any("--model" in note for note in getattr(err, "__notes__", ())):
        add_note(err, "the checkpoint holds another model's weights: pass the --model (and its arguments) the run"
                     " was trained with")
    return True


def _with_notes(err: BaseException) -> str:
    """The error and its notes, each note a sentence of its own (they are printed on one line)."""
    text = str(err).rstrip()
    for note in getattr(err, "__notes__", ()):
        text += ("" if not text or text[-1] in ".;:!?" else ".") + "\n" + note
    return text


def _fail(prefix: str, message: str) -> int:
    paragraph = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    print(f"{prefix}: error: {paragraph}", file=sys.stderr)
    return USAGE_ERROR


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CommandError(f"{message} (see --help)")


# ---------------------------------------------------------------------- fit
def _fit(argv: List[str]) -> int:
    from lightning_compress.commands.fit import run_fit

    for option in ("--model", "--data"):
        value = _option_value(argv, option)
        if value is not None and _looks_like_class_path(value):
            _import_class(value, option)
    trust = TRUST_FLAG in argv  # for this command only: never saved in the run's config
    return run_fit(_collect_overrides([item for item in argv if item != TRUST_FLAG]), trust_checkpoint_recipe=trust)


def _option_value(argv: Sequence[str], option: str) -> Optional[str]:
    for i, item in enumerate(argv):
        if item == option and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(option + "="):
            return item.split("=", 1)[1]
    return None


def _looks_like_class_path(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", value)) and not Path(value).exists()


def _collect_overrides(argv: List[str]) -> List[str]:
    """Turn repeated ``--override KEY=VALUE`` into the one list LightningCLI parses."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--override":
            if i + 1 >= len(argv):
                raise CommandError("--override needs a value, for example --override pruning.final_sparsity=0.8")
            overrides.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--override="):
            overrides.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    return rest + ([f"--override={json.dumps(overrides)}"] if overrides else [])


def _import_class(path: str, option: str) -> type:
    from lightning_compress.recipe_types import ImportPathError, import_object

    try:
        target = import_object(path)
    except ImportPathError as err:
        raise CommandError(f"{option} {path}: unknown class path: {err}") from None
    if not isinstance(target, type):
        raise CommandError(f"{option} {path} is not a class")
    return target


# ---------------------------------------------------------------------- export
def _export(argv: List[str]) -> int:
    parser = _Parser(prog="lightning-compress export", description="Pack a trained checkpoint into a directory.")
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint of a compression run")
    parser.add_argument("--model", required=True, help="the LightningModule class, as a dotted import path")
    parser.add_argument("--recipe", help="the recipe (default: the one stored in the checkpoint)")
    parser.add_argument("--override", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    parser.add_argument("-o", "--output",
                        help="directory to write (required, unless --recipe is given: then its export.dirpath)")
    parser.add_argument("--data", help="a LightningDataModule class path: batches for the output parity check")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory (a recipe's export.overwrite is ignored)")
    parser.add_argument("--format", action="append", default=[], choices=["onnx", "gguf"],
                        help="also write model.onnx or model.gguf (repeatable; replaces the recipe's export.formats)")
    parser.add_argument(TRUST_FLAG, action="store_true",
                        help="import and call the dotted paths of the checkpoint's stored recipe (export.input_fn)")
    args = parser.parse_args(argv)
    if "onnx" in args.format and not args.data:  # (the library's message names its `inputs` argument)
        raise CommandError("--format onnx traces the model with a batch of the data: pass --data, a"
                           " LightningDataModule class path")

    from lightning_compress.checkpoints import export_checkpoint, read_checkpoint

    model_class = _import_class(args.model, "--model")
    datamodule = None
    if args.data:
        data_class = _import_class(args.data, "--data")
        saved = read_checkpoint(args.checkpoint).get("datamodule_hyper_parameters") or {}
        arguments = {k: v for k, v in saved.items() if not k.startswith("_")}
        try:
            datamodule = data_class(**arguments)
        except TypeError as err:
            raise CommandError(
                f"--data {args.data}: cannot build it from the checkpoint's datamodule hyperparameters"
                f" {sorted(arguments)}: {err}; call save_hyperparameters() in its __init__"
            ) from None
    formats = [f"export.formats={json.dumps(['safetensors', *args.format])}"] if args.format else []
    report = export_checkpoint(
        args.checkpoint,
        model_class,
        recipe=args.recipe,
        overrides=[*args.override, *formats],
        output=args.output,
        datamodule=datamodule,
        overwrite=args.overwrite,
        trust_recipe=args.trust_checkpoint_recipe,
    )
    print(report.table())
    return 0


# ---------------------------------------------------------------------- inspect
def _inspect(argv: List[str]) -> int:
    parser = _Parser(prog="lightning-compress inspect", description="Per-layer table of a packed directory or a checkpoint.")
    parser.add_argument("path", help="a packed directory (from export) or a Lightning checkpoint")
    parser.add_argument("--verify", action="store_true",
                        help="also read model.safetensors and check it against the checksums in compression.json")
    args = parser.parse_args(argv)

    from lightning_compress.formats.inspection import inspect_path, verify_path

    verified = verify_path(args.path) if args.verify else None  # a failure prints no table
    print(inspect_path(args.path))
    if verified:
        print(verified)
    return 0


# ---------------------------------------------------------------------- recipes
def _recipes(argv: List[str]) -> int:
    parser = _Parser(prog="lightning-compress recipes",
                     description="List the ready recipes, or print one (to copy and edit: recipes NAME > my.yaml).")
    parser.add_argument("name", nargs="?", help="a ready recipe's name")
    args = parser.parse_args(argv)

    from lightning_compress.recipes import builtin_recipes, load_recipe

    ready = builtin_recipes()
    if args.name is None:
        width = max(map(len, ready))
        for name, path in ready.items():
            print(f"{name:<{width}}  {_header_line(path)}")
        print("\nUse one with --recipe NAME; print it to edit with: lightning-compress recipes NAME > my.yaml")
        return 0
    if args.name not in ready:
        load_recipe(args.name)  # raises the not-found error, with a close match and the list
        raise CommandError(f"{args.name!r} is a recipe file, not a ready recipe's name; choose one of {', '.join(ready)}")
    print(ready[args.name].read_text(), end="")
    return 0


def _header_line(path: Path) -> str:
    """The first comment line of a recipe: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


# ---------------------------------------------------------------------- sensitivity
def _sensitivity(argv: List[str]) -> int:
    from lightning_compress.commands.sensitivity import run_sensitivity

    return run_sensitivity(argv)


# ---------------------------------------------------------------------- demo
def _demo(argv: List[str]) -> int:
    from lightning_compress import demo

    return demo.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
