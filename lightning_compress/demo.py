"""`make demo`: distill, prune and quantize a digits classifier, export it, reload it, measure it.

On scikit-learn's digits (8x8 images, no download), in about a minute on 2 CPU cores:

1. train a float teacher (a small CNN);
2. train a float student (an MLP, 8x fewer parameters) as the baseline;
3. train the same student with ``recipes/distill_prune_quantize.yaml``: distillation from
   the teacher, 50% gradual pruning, int4 QAT, and the export (with its parity check);
4. reload the packed files with ``load_packed`` and evaluate them;
5. print one table: accuracy, size in bytes, CPU latency and the parity figure.

The compressed run is tracked with Weights & Biases (offline unless an API key is set);
the run directory is printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, List, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar

from lightning_compress.callbacks import CompressedExport
from lightning_compress.core.reporting import format_table
from lightning_compress.core.tracking import wandb_logger, wandb_run_dir
from lightning_compress.examples.digits import DigitsClassifier, DigitsDataModule, accuracy, load_digits_tensors
from lightning_compress.formats.loader import load_packed
from lightning_compress.formats.packed import WEIGHTS_FILE
from lightning_compress.recipes import BUILTIN_RECIPES_DIR, from_recipe

DEFAULT_RECIPE = BUILTIN_RECIPES_DIR / "distill_prune_quantize.yaml"
TEACHER = dict(arch="cnn", hidden=128)
STUDENT = dict(arch="mlp", hidden=64)


def _trainer(epochs: int, callbacks: List[Any], logger: Any = False, progress: bool = True) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[*callbacks, RichProgressBar()] if progress else callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        accelerator="cpu",
        devices=1,
    )


def _float_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@torch.no_grad()
def _latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 30) -> str:
    """Median milliseconds of one forward pass over ``x``, after a warm-up."""
    model.eval()
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - started)
    return f"{1000 * sorted(times)[len(times) // 2]:.2f}"


def run(output: Path, epochs: int, seed: int, recipe: Union[str, Path], progress: bool = True) -> List[List[Any]]:
    """Train, compress, export and reload; return the table rows."""
    output.mkdir(parents=True, exist_ok=True)
    _, _, x_val, y_val = load_digits_tensors(seed)
    data = DigitsDataModule(seed=seed)

    pl.seed_everything(seed, verbose=False)
    teacher = DigitsClassifier(**TEACHER)
    teacher_trainer = _trainer(epochs, [], progress=progress)
    teacher_trainer.fit(teacher, data)
    teacher_path = output / "teacher.ckpt"
    teacher_trainer.save_checkpoint(teacher_path)

    pl.seed_everything(seed, verbose=False)
    student = DigitsClassifier(**STUDENT)
    _trainer(epochs, [], progress=progress).fit(student, data)

    packed_dir = output / "student-packed"
    callbacks = from_recipe(
        recipe,
        [
            f"distillation.teacher={teacher_path}",
            f"distillation.teacher_class={DigitsClassifier.__module__}.{DigitsClassifier.__name__}",
            f"export.dirpath={packed_dir}",
            "export.overwrite=true",
        ],
    )
    logger = wandb_logger(project="lightning-compress-demo", save_dir=str(output), name="digits-distill-prune-int4")
    pl.seed_everything(seed, verbose=False)
    compressed = DigitsClassifier(**STUDENT)
    _trainer(epochs, callbacks, logger=logger, progress=progress).fit(compressed, data)
    logger.experiment.finish()
    export_report = next(c for c in callbacks if isinstance(c, CompressedExport)).report

    packed = load_packed(packed_dir, lambda: DigitsClassifier(**STUDENT))
    parity = export_report.parity
    rows = [
        ["teacher (float CNN)", accuracy(teacher, x_val, y_val), _float_bytes(teacher), _latency_ms(teacher, x_val), ""],
        ["student (float MLP)", accuracy(student, x_val, y_val), _float_bytes(student), _latency_ms(student, x_val), ""],
        [
            "student distilled + 50% pruned + int4 (reloaded packed files)",
            accuracy(packed, x_val, y_val),
            (packed_dir / WEIGHTS_FILE).stat().st_size,
            _latency_ms(packed, x_val),
            f"rel. error {parity.relative_error:.1e}, weights {'exact' if parity.weights_exact else 'DIFFER'}",
        ],
    ]
    print()
    print(
        format_table(
            f"digits: {len(y_val)} validation images, {epochs} epochs each, latency = one batch of {len(y_val)} on CPU",
            ["model", "val accuracy", "bytes", "latency ms", "parity vs fake-quant model"],
            rows,
        )
    )
    print(f"\npacked model: {packed_dir}  (inspect it: lightning-compress inspect {packed_dir})")
    print(f"W&B run written to {wandb_run_dir(logger)}")
    return rows


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-compress demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of each of the three trainings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE),
                        help="the student's compression recipe: a YAML path or a ready recipe's name")
    parser.add_argument("--output", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    output = args.output or Path(tempfile.mkdtemp(prefix="lightning-compress-demo-"))
    run(output, args.epochs, args.seed, args.recipe, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
