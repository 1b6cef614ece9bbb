"""A bit width per layer under a budget of average bits per weight, and the QAT recipe for it.

The choice is a multiple-choice knapsack: pick one candidate per layer so that
``sum(params * bits) <= budget * sum(params)`` with the least ``sum(delta)`` (each layer's
measured delta at its bits; deltas of layers compressed together are assumed to add up,
the usual first-order estimate). :func:`allocate_bits` solves it exactly by dynamic
programming over the layers on the exact integer cost (bits x params, no discretisation):
after each layer it keeps only the Pareto front of (cost, loss) pairs, so the work grows
with the number of undominated partial assignments, not with the budget. A greedy by
marginal loss per bit saved can be far from optimal when layers differ in size (a small
fragile layer and a large robust one; a test has one), and the exact answer costs little
at the sizes of real models: 200 layers with three candidates in 0.3 s, 1000 in 11 s
(one busy CPU core). A front of more than ``MAX_FRONT`` points is thinned to the best
point of each of ``MAX_FRONT`` cost buckets (1/20000 of the budget wide); the result then
still meets the budget, and ``BitAllocation.exact`` is False.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from lightning_compress.core.validate import ArgumentError, check_number
from lightning_compress.recipes import load_recipe
from lightning_compress.sensitivity.report import SensitivityReport

MAX_FRONT = 20_000
MAX_BUDGET_BITS = 32.0
# QAT settings that define the grid the deltas were measured on, or that the recipe writes.
_MEASURED_KEYS = ("weights", "granularity", "group_size", "symmetric", "scale_dtype", "overrides", "targets", "exclude")


@dataclass(frozen=True)
class BitAllocation:
    """The bit width chosen for each layer.

    Attributes:
        bits: ``{layer: bits}`` in the report's layer order.
        average_bits: the parameter-weighted mean bits per weight (weights only: scales,
            biases and layers outside the report are not counted).
        estimated_delta: the sum of the chosen rows' deltas.
        exact: False when the search was thinned (see the module docstring).
    """

    bits: Dict[str, int]
    average_bits: float
    estimated_delta: float
    exact: bool = True


def allocate_bits(report: SensitivityReport, budget_bits: float) -> BitAllocation:
    """The bit width per layer, among the report's candidates, with the least summed delta
    whose parameter-weighted average is at most ``budget_bits``.

    Raises:
        ArgumentError: ``report`` has no quantization rows, ``budget_bits`` is not a
            number, is above 32, or is below the smallest candidate (no assignment fits).
    """
    if not isinstance(report, SensitivityReport) or not report.bits:
        raise ArgumentError(
            "report", "`report` must be a SensitivityReport measured with bit-width candidates (layer_sensitivity(..., bits=(8, 4, 3)))"
        )
    check_budget(budget_bits, report.bits)
    layers = report.layers
    choices = [{row.bits: row.delta for row in report.rows if row.layer == layer and row.bits is not None} for layer in layers]
    missing = [layer for layer, choice in zip(layers, choices) if set(choice) != set(report.bits)]
    if missing:
        raise ArgumentError("report", f"`report` has no row for some of the bits {report.bits} of layers {missing}; measure them")
    # A candidate whose delta is not finite (a 2-bit layer that overflowed the loss) is no choice.
    choices = [{bits: delta for bits, delta in choice.items() if math.isfinite(delta)} for choice in choices]
    broken = [layer for layer, choice in zip(layers, choices) if not choice]
    if broken:
        raise ArgumentError(
            "report", f"every candidate of {broken[:5]}{' ...' if len(broken) > 5 else ''} gave a delta (loss or KL)"
            " that is not finite, so no bit width can be chosen for them; measure them at more bits, or leave them out of the"
            " report (`exclude`)"
        )
    params = list(layers.values())
    capacity = int(Fraction(repr(float(budget_bits))) * sum(params))  # exact: 3.3 means 33/10
    least = sum(n * min(choice) for n, choice in zip(params, choices))
    if least > capacity:  # possible only where non-finite candidates were left out
        raise ArgumentError(
            "budget_bits", f"`budget_bits`={budget_bits} cannot be met: without the candidates whose delta is not"
            f" finite, the fewest bits average {math.ceil(least / sum(params) * 1000) / 1000:.3f} (rounded up); raise"
            " the budget to at least that"
        )
    chosen, exact = _knapsack(params, choices, capacity)
    bits = dict(zip(layers, chosen))
    total = sum(n * b for n, b in zip(params, chosen))
    delta = sum(choice[b] for choice, b in zip(choices, chosen))
    return BitAllocation(bits=bits, average_bits=total / sum(params), estimated_delta=delta, exact=exact)


def check_budget(budget_bits: Any, candidates: Sequence[int]) -> None:
    """Refuse a ``budget_bits`` that is not a number in (0, 32] or that no assignment of
    ``candidates`` (bit widths) fits: before measuring anything.

    Raises:
        ArgumentError: naming ``budget_bits`` and the fix.
    """
    check_number("budget_bits", budget_bits, low=0, low_open=True, high=MAX_BUDGET_BITS,
                 what=f"a number of bits per weight in (0, {MAX_BUDGET_BITS:g}]")
    if candidates and budget_bits < min(candidates):
        raise ArgumentError(
            "budget_bits",
            f"`budget_bits`={budget_bits} is below the smallest candidate ({min(candidates)} bits): no assignment fits;"
            f" raise the budget to at least {min(candidates)} (`--budget-bits` on the command line) or measure a"
            " smaller candidate (`bits=(..., 2)` in Python, `--bits ... 2` on the command line)",
        )


def mixed_precision_recipe(
    report: SensitivityReport, budget_bits: float, *, base: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """A recipe whose ``qat`` section quantizes each layer at the bits
    :func:`allocate_bits` chooses: ``{"qat": {"weights": <the bits most layers get>,
    "group_size": ..., "overrides": {"<layer>": {"bits": b}, ...}}}``, plus ``targets``/
    ``exclude`` when the report was measured with them.

    ``load_recipe`` and ``from_recipe`` take it as it is, and so does a YAML file of it.
    Override keys are the layer names with glob characters escaped, listed deepest name
    first (QAT takes the first glob that matches a name or its trailing part), so each
    layer gets exactly the bits chosen for it.

    Args:
        report: from :func:`~lightning_compress.sensitivity.layer_sensitivity`.
        budget_bits: the most average bits per weight over the report's layers.
        base: a recipe to add the ``qat`` section to (its other sections, and QAT
            settings such as ``start_step``, are kept); it may not set what the report
            decides (``weights``, ``granularity``, ``group_size``, ``symmetric``,
            ``scale_dtype``, ``overrides``, ``targets``, ``exclude``).

    Raises:
        ArgumentError: as :func:`allocate_bits`, and for a ``base`` that is not a mapping
            or sets one of the keys above.
        RecipeError: ``base`` is not a valid recipe.
    """
    return recipe_from_allocation(report, allocate_bits(report, budget_bits), base=base)


def recipe_from_allocation(
    report: SensitivityReport, allocation: BitAllocation, *, base: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """:func:`mixed_precision_recipe` for an ``allocation`` already chosen from ``report``
    (by :func:`allocate_bits`), so a caller that also reports it solves once."""
    recipe = _check_base(base)
    counts, params, sizes = Counter(allocation.bits.values()), Counter(), report.layers
    for layer, bits in allocation.bits.items():
        params[bits] += sizes[layer]
    main = max(counts, key=lambda b: (counts[b], params[b], b))
    qat = dict(recipe.get("qat") or {})
    qat["weights"] = main
    if report.group_size is not None:
        qat["group_size"] = report.group_size
    overrides = _overrides(allocation.bits, main)
    if overrides:
        qat["overrides"] = overrides
    for argument in ("targets", "exclude"):
        selection = getattr(report, argument)
        if selection is not None:
            qat[argument] = [_target_text(target) for target in selection]
    recipe["qat"] = qat
    load_recipe(recipe)  # a bad `base` fails here, naming its key
    return recipe


def _knapsack(params: Sequence[int], choices: Sequence[Mapping[int, float]], capacity: int) -> Tuple[List[int], bool]:
    """Exact multiple-choice knapsack on the Pareto front; see the module docstring.

    Plain Python: the fronts of real models hold a few thousand points, and tensor ops
    on arrays that small cost more in overhead (and thread wake-ups) than they save.
    """
    rest = sum(n * min(choice) for n, choice in zip(params, choices))  # the cheapest cost of the layers to come
    # A front: (cost, loss, index of its parent on the previous front, bits), cost rising
    # strictly and loss never rising: every point beats each cheaper one, or ties it.
    front: List[Tuple[int, float, int, int]] = [(0, 0.0, -1, 0)]
    fronts = []
    exact = True
    for n, choice in zip(params, choices):
        rest -= n * min(choice)
        room = capacity - rest  # what this and the earlier layers may cost, so the rest still fits
        shifted = [[(cost + n * bits, loss + choice[bits], j, bits) for j, (cost, loss, _, _) in enumerate(front)
                    if cost + n * bits <= room] for bits in sorted(choice)]
        front, best, last_cost = [], math.inf, None
        for point in sorted(itertools.chain.from_iterable(shifted)):  # sorted runs: timsort merges them
            if point[0] != last_cost and point[1] <= best:  # the least loss of each cost, if no cheaper point beats it
                front.append(point)
                best = point[1]
            last_cost = point[0]
        if len(front) > MAX_FRONT:
            front, exact = _thin(front, room), False
        fronts.append(front)
    # The last point has the least loss, and of equal losses the most bits.
    index, chosen = len(front) - 1, []
    for front in reversed(fronts):
        _, _, parent, bits = front[index]
        chosen.append(bits)
        index = parent
    return chosen[::-1], exact


def _thin(front: List[Tuple[int, float, int, int]], room: int) -> List[Tuple[int, float, int, int]]:
    """The least-loss point (the last) of each of ``MAX_FRONT`` equal cost buckets."""
    last: Dict[int, Tuple[int, float, int, int]] = {}
    for point in front:
        last[point[0] * MAX_FRONT // max(room, 1)] = point
    return list(last.values())


def _overrides(bits: Mapping[str, int], main: int) -> Dict[str, Dict[str, int]]:
    """Overrides for the layers off ``main``, and for the layers at ``main`` that one of
    those globs would also catch (as a trailing part of their name); deepest names first."""
    special = [layer for layer, b in bits.items() if b != main]
    needed = [layer for layer in bits if layer in special or any(layer.endswith("." + s) for s in special)]
    order = sorted(needed, key=lambda layer: -layer.count("."))  # stable: model order within a depth
    return {_escape(layer): {"bits": bits[layer]} for layer in order}


def _escape(name: str) -> str:
    """A glob that matches exactly ``name`` (``*``, ``?`` and ``[`` in brackets)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _target_text(target: Any) -> str:
    """A recipe's spelling of a target: a glob as it is, a layer type as its import path."""
    if isinstance(target, str):
        return target
    if getattr(nn, target.__name__, None) is target:
        return f"torch.nn.{target.__name__}"
    return f"{target.__module__}.{target.__qualname__}"


def _check_base(base: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    if base is None:
        return {}
    if not isinstance(base, Mapping):
        raise ArgumentError(
            "base", f"`base` must be a recipe as a dict (e.g. {{'export': {{'dirpath': 'out'}}}}), got {type(base).__name__}"
        )
    recipe = copy.deepcopy(dict(base))
    qat = recipe.get("qat") or {}
    if not isinstance(qat, Mapping):
        raise ArgumentError("base", f"`base['qat']` must be a dict of QAT settings, got {qat!r}")
    decided = [key for key in _MEASURED_KEYS if key in qat]
    if decided:
        raise ArgumentError(
            "base",
            f"`base['qat']` sets {decided}, which the sensitivity report decides (its grid and layers); remove them"
            " from `base`, or measure the report with the group_size/targets you want",
        )
    return recipe


__all__ = ["BitAllocation", "allocate_bits", "check_budget", "mixed_precision_recipe", "recipe_from_allocation",
           "MAX_FRONT"]
