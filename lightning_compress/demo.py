"""`make demo`: gradual magnitude pruning of a digits classifier, dense vs pruned.

Trains the same network twice on scikit-learn's digits (same seed, same epochs): once
dense, once with ``MagnitudePruning`` to 80% sparsity, then prints both accuracies and
the sparsity reached. Runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning.pytorch as pl

from lightning_compress import MagnitudePruning
from lightning_compress.core.reporting import format_table
from lightning_compress.examples.digits import (
    DigitsClassifier,
    DigitsDataModule,
    accuracy,
    load_digits_tensors,
)


def _train(callbacks, epochs: int, seed: int):
    pl.seed_everything(seed, verbose=False)
    model = DigitsClassifier(arch="mlp", hidden=256)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        accelerator="cpu",
    )
    started = time.perf_counter()
    trainer.fit(model, DigitsDataModule(seed=seed))
    return model, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    _, _, x_val, y_val = load_digits_tensors(args.seed)
    dense, dense_time = _train([], args.epochs, args.seed)
    pruning = MagnitudePruning(args.sparsity, start_step=0.1, end_step=0.7)
    pruned, pruned_time = _train([pruning], args.epochs, args.seed)

    weights = [p for n, p in pruned.named_parameters() if n.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    rows = [
        ["dense", f"{accuracy(dense, x_val, y_val):.4f}", "0.0000", f"{dense_time:.1f}"],
        [
            f"pruned ({args.sparsity:.0%} target)",
            f"{accuracy(pruned, x_val, y_val):.4f}",
            f"{zeros / total:.4f}",
            f"{pruned_time:.1f}",
        ],
    ]
    print()
    print(
        format_table(
            f"digits MLP, {args.epochs} epochs, validation set of {len(y_val)} images",
            ["model", "val accuracy", "weight sparsity", "train seconds"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
