"""Digits accuracy: dense vs 80% unstructured vs 2:4 MagnitudePruning, mean of 3 seeds.

An MLP (64 -> 256 -> 256 -> 10, AdamW) trained for 20 epochs on scikit-learn's digits;
pruning runs from 10% to 70% of the run on the cubic schedule. Accuracy on the held-out
quarter of the data.

    python benchmarks/pruning_accuracy.py [--seeds 3] [--epochs 20]
"""

from __future__ import annotations

import argparse
import statistics

import lightning.pytorch as pl

from common import headline, machine, quiet_trainer  # noqa: E402  (sets sys.path)

from lightning_compress import MagnitudePruning
from lightning_compress.examples.digits import DigitsClassifier, DigitsDataModule, accuracy, load_digits_tensors

CONFIGS = {
    "dense": lambda: [],
    "80% unstructured": lambda: [MagnitudePruning(0.8, start_step=0.1, end_step=0.7)],
    "2:4 (50%)": lambda: [MagnitudePruning(pattern="2:4", start_step=0.1, end_step=0.7)],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    results = {name: [] for name in CONFIGS}
    for seed in range(args.seeds):
        _, _, x_val, y_val = load_digits_tensors(seed)
        for name, callbacks in CONFIGS.items():
            pl.seed_everything(seed, verbose=False)
            model = DigitsClassifier(arch="mlp", hidden=256)
            quiet_trainer(max_epochs=args.epochs, callbacks=callbacks()).fit(model, DigitsDataModule(seed=seed))
            results[name].append(accuracy(model, x_val, y_val))

    print(f"# digits accuracy, MLP 64-256-256-10, {args.epochs} epochs, seeds 0..{args.seeds - 1}; {machine()}")
    print("| model | val accuracy (mean) | per seed |")
    print("|---|---|---|")
    for name, values in results.items():
        per_seed = ", ".join(f"{v:.4f}" for v in values)
        print(f"| {name} | {statistics.mean(values):.4f} | {per_seed} |")
        headline("accuracy vs PTQ", f"digits MLP {name} (accuracy, mean of {args.seeds} seeds)",
                 f"{statistics.mean(values):.4f}", "reported (issue 2)")
    print("Target (issue 2): report dense vs 80% unstructured vs 2:4, mean of 3 seeds.")


if __name__ == "__main__":
    main()
