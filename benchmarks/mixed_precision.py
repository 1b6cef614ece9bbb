"""Sensitivity-driven mixed precision vs uniform int4 at the same size (issue 19).

The char LM of qat_init.py (float base, then QAT branched from its checkpoint, several
seeds). ``layer_sensitivity`` measures, on 8 training batches of the float model, the loss
increase of each Linear layer alone at int8/int4/int3/int2 (group 32);
``mixed_precision_recipe`` picks per-layer bits averaging at most 4.0 bits per weight
(parameter-weighted) with the least summed increase. Uniform int4 g32 has the same
average, the same number of group scales and so the same file size. Both are compared
as round-to-nearest PTQ points of the float model and after QAT (min/max ranges, same
start and steps); held-out perplexity.

    python benchmarks/mixed_precision.py [--seeds 3]
"""

from __future__ import annotations

import copy

from torch import nn

from common import headline, machine, charlm_arguments, seed_summary as summary
from qat_init import CALIBRATION_BATCHES, CharLMSeed

from lightning_compress import from_recipe
from lightning_compress.examples.charlm import perplexity
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.quant.weights import attach_weight_quantizers
from lightning_compress.sensitivity import allocate_bits, layer_sensitivity, mixed_precision_recipe

BUDGET = 4.0
CANDIDATES = (8, 6, 5, 4, 3, 2)


def round_to_nearest_bits(model: nn.Module, bits: dict) -> nn.Module:
    """A copy of ``model`` with each Linear rounded to nearest at ``bits[name]`` (group 32)."""
    model = copy.deepcopy(model)
    layers = {name: model.get_submodule(name) for name in bits}
    for quantizer in attach_weight_quantizers(layers, {n: QuantSpec(b, "group", 32) for n, b in bits.items()}).values():
        quantizer.enabled = True
    return model


def run_seed(run: CharLMSeed) -> dict:
    batches = [batch for _, batch in zip(range(8), run.data.train_dataloader())]
    report = layer_sensitivity(copy.deepcopy(run.float_model), batches, bits=CANDIDATES, group_size=32)
    allocation = allocate_bits(report, BUDGET)
    uniform = {name: 4 for name in allocation.bits}
    results = {
        "float": run.results["float"],
        "average bits": allocation.average_bits,
        "ptq uniform": perplexity(round_to_nearest_bits(run.float_model, uniform), run.val),
        "ptq mixed": perplexity(round_to_nearest_bits(run.float_model, allocation.bits), run.val),
        "allocation": allocation.bits,
    }
    start = run.base_steps + CALIBRATION_BATCHES
    recipe = mixed_precision_recipe(report, BUDGET)
    mixed = from_recipe({"qat": {**recipe["qat"], "start_step": start}})
    results["qat mixed"] = perplexity(run.train(run.total, mixed), run.val)
    uniform_qat = from_recipe({"qat": {"weights": 4, "group_size": 32, "start_step": start}})
    results["qat uniform"] = perplexity(run.train(run.total, uniform_qat), run.val)
    return results


def main() -> None:
    args = charlm_arguments()
    runs = [run_seed(CharLMSeed(seed, args.base_steps, args.extra_steps)) for seed in range(args.seeds)]

    print(f"# Mixed precision at {BUDGET} average bits vs uniform int4 g32 (same size): char LM, mean ± sd of"
          f" {args.seeds} seeds; {machine()}")
    print("| | uniform int4 g32 | sensitivity-driven mix |\n|---|---|---|")
    float_ppl, _ = summary(runs, "float")
    for stage in ("ptq", "qat"):
        (u, u_sd), (m, m_sd) = summary(runs, f"{stage} uniform"), summary(runs, f"{stage} mixed")
        label = "round to nearest (PTQ)" if stage == "ptq" else "QAT"
        print(f"| {label}, perplexity (float {float_ppl:.3f}) | {u:.3f} ± {u_sd:.3f} | {m:.3f} ± {m_sd:.3f} |")
        headline("accuracy vs PTQ", f"char LM {label} at {BUDGET} bits/weight: perplexity uniform int4 / mixed",
                 f"{u:.3f} / {m:.3f} (float {float_ppl:.3f})", "mixed better than uniform (issue 19)")
    print("\n| seed | average bits | bits per layer |\n|---|---|---|")
    for seed, run in enumerate(runs):
        bits = ", ".join(f"{name} {b}" for name, b in run["allocation"].items())
        print(f"| {seed} | {run['average bits']:.3f} | {bits} |")


if __name__ == "__main__":
    main()
