"""Training-step overhead of MagnitudePruning vs plain training vs Lightning's ModelPruning.

A transformer MLP block (d=768 -> 3072 -> 768, AdamW) on 2048 tokens a step, pruned to
80% unstructured sparsity on a cubic schedule updated every `--update-every` steps. The
three configurations run interleaved in one process (plain, ours, Lightning, plain, ...),
and each ratio is the median over rounds of (config / plain of the same round), where a
run's time is train time / optimizer steps, epoch-end hooks included (ModelPruning
prunes there).

    python benchmarks/pruning_overhead.py [--steps 20] [--rounds 7]
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch.callbacks import ModelPruning

from common import MLPBlock, TrainTime, headline, interleaved, machine, median, paired_ratio, quiet_trainer, token_batches

from lightning_compress import MagnitudePruning
from lightning_compress.sparsity.schedules import scheduled_sparsity


def lightning_amounts(final: float, end: int, every: int):
    """ModelPruning prunes a fraction of the *remaining* weights each epoch (torch.prune);
    turn the cumulative cubic schedule into those increments, one epoch = `every` steps."""

    def cumulative(epoch: int) -> float:
        step = min((epoch + 1) * every, end)
        return scheduled_sparsity(step, initial=0.0, final=final, start=0, end=end, update_every=every) or 0.0

    def amount(epoch: int) -> float:
        before = cumulative(epoch - 1) if epoch > 0 else 0.0
        return max(0.0, (cumulative(epoch) - before) / (1.0 - before))

    return amount


def run(config: str, data, steps: int, every: int, final: float) -> float:
    torch.manual_seed(0)
    model = MLPBlock()
    timer = TrainTime()
    callbacks = [timer]
    end = steps - every
    if config == "ours":
        callbacks.append(MagnitudePruning(final, start_step=0, end_step=end, update_every=every))
    elif config == "lightning":
        callbacks.append(
            ModelPruning(
                "l1_unstructured",
                amount=lightning_amounts(final, end, every),
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        )
    quiet_trainer(max_steps=steps, callbacks=callbacks).fit(model, data)
    return timer.seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--update-every", type=int, default=10)
    args = parser.parse_args()

    data = token_batches(args.tokens, args.update_every)
    configs = ["plain", "ours", "lightning"]
    times = interleaved(configs, lambda c: run(c, data, args.steps, args.update_every, final=0.8), args.rounds)

    print(f"# pruning overhead: MLP block d=768, {args.tokens} tokens/step, AdamW, 80% cubic,"
          f" update every {args.update_every} steps; {args.steps} steps x {args.rounds} rounds; {machine()}")
    print("| configuration | s/step (median) | vs plain (median of paired ratios) |")
    print("|---|---|---|")
    for config, label in [("plain", "plain training"), ("ours", "MagnitudePruning"), ("lightning", "Lightning ModelPruning")]:
        print(f"| {label} | {median(times[config]):.4f} | {paired_ratio(times, config, 'plain'):.3f}x |")
        if config != "plain":
            headline("training overhead", f"{label} (80% cubic) vs plain training (s/step)",
                     f"{paired_ratio(times, config, 'plain'):.3f}x", "<= 1.03x (issue 2)" if config == "ours" else None)
    print("Target (issue 2): MagnitudePruning at most 1.03x of plain training.")


if __name__ == "__main__":
    main()
