"""Where the int4 QAT gap of qat_init.py is lost (issue 19): held-out perplexity along the
200 steps after the float base, for the float model and for QAT from its best start.

qat_init.py's figure compares QAT's perplexity at step 1400 with the float model's at the
same step. This benchmark follows both runs of each seed (the float model trained on from
the 1200-step base, and QAT with ``init="gptq"`` and mse ranges, int4 group 32, starting
16 steps in) and measures held-out perplexity every 24 steps, to show which part of the
gap QAT closes quickly (the rounding at its start) and which it does not (what the float
model still gains while its learning rate decays to its end).

    python benchmarks/qat_trajectory.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import lightning.pytorch as pl

from common import headline, machine, print_table

from qat_init import CALIBRATION_BATCHES, STARTS, CharLMSeed, qat_callbacks
from lightning_compress import QuantSpec
from lightning_compress.examples.charlm import perplexity
from lightning_compress.quant import round_to_nearest

BASE_STEPS, EXTRA_STEPS, EVERY = 1200, 200, 24
START = "gptq + mse"
QAT_START_STEP = BASE_STEPS + CALIBRATION_BATCHES
# the first step after QAT's start, then every EVERY steps to the end of the run
STEPS = (QAT_START_STEP + 1, *range(BASE_STEPS + 2 * EVERY, BASE_STEPS + EXTRA_STEPS, EVERY), BASE_STEPS + EXTRA_STEPS)


class HeldOutTrajectory(pl.Callback):
    """Held-out perplexity after the optimizer steps in ``STEPS``."""

    def __init__(self, loader) -> None:
        self.loader, self.perplexities = loader, {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step in STEPS and trainer.global_step not in self.perplexities:
            self.perplexities[trainer.global_step] = perplexity(pl_module, self.loader)


def trajectories(seed: int) -> tuple[tuple[dict, dict], float]:
    """The float run's and the QAT run's perplexity at each of ``STEPS``, and the final
    float model's round-to-nearest perplexity, one seed."""
    run = CharLMSeed(seed, BASE_STEPS, EXTRA_STEPS)
    float_run, qat_run = HeldOutTrajectory(run.val), HeldOutTrajectory(run.val)
    run.train(run.total, [float_run])
    # the same float run as the cached one that qat_init.py reports: the trajectory ends on it
    assert abs(float_run.perplexities[run.total] - run.results["float"]) < 1e-6, "float run not reproducible"
    run.train(run.total, [*qat_callbacks(STARTS[START], QAT_START_STEP, weights=4, group_size=32), qat_run])
    rtn = copy.deepcopy(run.float_model)
    round_to_nearest(rtn, QuantSpec(4, "group", 32))
    return (float_run.perplexities, qat_run.perplexities), perplexity(rtn, run.val)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    runs = [trajectories(seed) for seed in range(args.seeds)]
    mean = {label: {step: statistics.mean(run[index][step] for run, _rtn in runs) for step in STEPS}
            for index, label in enumerate(("float", "qat"))}

    difference = {step: mean["qat"][step] - mean["float"][step] for step in STEPS}
    closest, end = min(STEPS[1:], key=difference.get), STEPS[-1]
    gap = statistics.mean(rtn for _trajectories, rtn in runs) - mean["float"][end]

    print(f"# Held-out perplexity along the QAT window: char LM d=64, int4 g32, QAT {START} from step"
          f" {QAT_START_STEP}, mean of {args.seeds} seeds; {machine()}")
    print_table(["step", "float", f"QAT {START}", "QAT - float"],
                [[str(step), f"{mean['float'][step]:.3f}", f"{mean['qat'][step]:.3f}", f"{difference[step]:+.3f}"]
                 for step in STEPS])
    headline("accuracy vs PTQ", f"char LM int4 g32 QAT {START}: QAT - float perplexity, closest after the start /"
             f" at the end (RTN PTQ gap at the end: {gap:.3f})",
             f"{difference[closest]:+.3f} (step {closest}) / {difference[end]:+.3f} (step {end})")
    print(f"Target: none; this locates the part of qat_init.py's int4 gap that QAT leaves (issue 19's target:"
          f" >= 85% of the gap closed). The RTN PTQ gap of the float model at step {end}: {gap:.3f}.")


if __name__ == "__main__":
    main()
