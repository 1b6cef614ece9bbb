"""`make demo`: a digits classifier dense, pruned, and pruned + int4 QAT.

Trains the same network three times on scikit-learn's digits (same seed, same epochs):
dense; with ``MagnitudePruning`` to 80% sparsity; and with pruning and int4
``QuantizationAwareTraining`` stacked. Prints accuracy and sparsity of each. Runs in well
under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning.pytorch as pl

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
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

    def pruning():
        return MagnitudePruning(args.sparsity, start_step=0.1, end_step=0.7)

    runs = [
        ("dense (float32)", []),
        (f"pruned {args.sparsity:.0%}", [pruning()]),
        (f"pruned {args.sparsity:.0%} + int4 QAT", [pruning(), QuantizationAwareTraining("int4", group_size=32, start_step=0.5)]),
    ]
    rows = []
    for label, callbacks in runs:
        model, seconds = _train(callbacks, args.epochs, args.seed)
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        zeros = sum(int((w == 0).sum()) for w in weights)
        total = sum(w.numel() for w in weights)
        rows.append([label, f"{accuracy(model, x_val, y_val):.4f}", f"{zeros / total:.4f}", f"{seconds:.1f}"])
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
