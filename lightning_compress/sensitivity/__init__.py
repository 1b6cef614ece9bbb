"""Per-layer sensitivity and a mixed-precision recipe from it.

    report = layer_sensitivity(model, batches, bits=(8, 4, 3), group_size=32)
    print(report.table())
    recipe = mixed_precision_recipe(report, budget_bits=4.0)   # {"qat": {..., "overrides": {...}}}
    trainer = Trainer(callbacks=from_recipe(recipe))

:func:`layer_sensitivity` compresses one layer at a time (QAT's grid, or a magnitude
mask) and measures the loss increase on a few batches; :func:`allocate_bits` picks a
bit width per layer within an average-bits budget with the least summed increase (exact);
:func:`mixed_precision_recipe` writes that as a recipe. ``lightning-compress sensitivity``
runs all three from the command line.
"""

from lightning_compress.sensitivity.budget import BitAllocation, allocate_bits, check_budget, mixed_precision_recipe, recipe_from_allocation
from lightning_compress.sensitivity.measure import REFERENCES, check_bits, layer_sensitivity
from lightning_compress.sensitivity.report import COLUMNS, TABLE_KEY, SensitivityReport, SensitivityRow

__all__ = [
    "layer_sensitivity",
    "check_bits",
    "SensitivityReport",
    "SensitivityRow",
    "allocate_bits",
    "BitAllocation",
    "mixed_precision_recipe",
    "recipe_from_allocation",
    "check_budget",
    "REFERENCES",
    "COLUMNS",
    "TABLE_KEY",
]
