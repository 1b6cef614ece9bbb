"""What :func:`~lightning_compress.sensitivity.layer_sensitivity` measured: one row per
(layer, candidate), and the ways to read it (ranking, console table, CSV, W&B table, plot)."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lightning_compress.core.atomic import atomic_write, atomic_write_bytes
from lightning_compress.core.reporting import format_table
from lightning_compress.core.targeting import Target
from lightning_compress.core.validate import ArgumentError

COLUMNS = ("layer", "type", "params", "bits", "sparsity", "delta")
TABLE_KEY = "sensitivity/layers"


@dataclass(frozen=True)
class SensitivityRow:
    """One layer compressed alone at one candidate.

    Attributes:
        layer: the weight key (the layer's name; ``<layer>.<param>`` for each weight
            matrix of a recurrent layer), as QAT's ``overrides`` and reports name it.
        type: the layer's class name.
        params: elements of the weight.
        bits: the bit width it was fake-quantized to; ``None`` for a pruning row.
        sparsity: the fraction pruned; 0.0 for a quantization row.
        delta: the increase over the float model: of the mean loss
            (``reference="loss"``), or the mean KL divergence (``"kl"``).
    """

    layer: str
    type: str
    params: int
    bits: Optional[int]
    sparsity: float
    delta: float

    def values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, column) for column in COLUMNS)


@dataclass(frozen=True)
class SensitivityReport:
    """The rows of a sensitivity run and the settings they were measured with.

    Attributes:
        rows: one :class:`SensitivityRow` per (layer, candidate), layers in model order,
            bit widths from high to low, then sparsities from low to high.
        reference: ``"loss"`` or ``"kl"``.
        baseline: the float model's mean loss over the batches (0.0 for ``"kl"``).
        bits, sparsities: the candidates.
        group_size: the grid's group size (``None``: per output channel).
        targets, exclude: the layer selection, as given.
        batches: how many batches each case was evaluated on.
    """

    rows: Tuple[SensitivityRow, ...] | List[SensitivityRow]
    reference: str
    baseline: float
    bits: Tuple[int, ...]
    sparsities: Tuple[float, ...]
    group_size: Optional[int]
    targets: Optional[Tuple[Target, ...]]
    exclude: Optional[Tuple[Target, ...]]
    batches: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(self.rows))

    @property
    def layers(self) -> Dict[str, int]:
        """``{layer: params}`` in model order."""
        return {row.layer: row.params for row in self.rows}

    def delta(self, layer: str, *, bits: Optional[int] = None, sparsity: float = 0.0) -> float:
        """The delta of ``layer`` at ``bits`` (a quantization row) or ``sparsity`` (a pruning row).

        Raises:
            KeyError: no such row.
        """
        for row in self.rows:
            if row.layer == layer and row.bits == bits and row.sparsity == sparsity:
                return row.delta
        raise KeyError(f"no row for layer {layer!r} at bits={bits}, sparsity={sparsity}; layers: {list(self.layers)}")

    def ranking(self, *, bits: Optional[int] = None, sparsity: float = 0.0) -> List[Tuple[str, float]]:
        """``[(layer, delta), ...]`` most sensitive first, at ``bits`` (default: the lowest
        candidate) or, with ``sparsity`` set, at that sparsity. A delta that is not a number
        ranks first: that layer alone broke the model's loss.

        Raises:
            ArgumentError: ``bits`` or ``sparsity`` is not a candidate the report measured.
        """
        if bits is None and not sparsity:
            if not self.bits:
                raise ArgumentError("bits", f"this report measured no bit widths, only sparsities {list(self.sparsities)};"
                                    " rank those with ranking(sparsity=...)")
            bits = min(self.bits)
        if bits is not None and sparsity:
            raise ArgumentError("sparsity", f"each row holds one candidate, bits or a sparsity: rank bits={bits!r} or"
                                f" sparsity={sparsity!r}, not both")
        if sparsity and sparsity not in self.sparsities:
            raise ArgumentError("sparsity", f"sparsity={sparsity!r} was not measured; the report has {list(self.sparsities)}")
        if not sparsity and bits not in self.bits:
            raise ArgumentError("bits", f"bits={bits!r} was not measured; the report has {list(self.bits)}")
        chosen = [(row.layer, row.delta) for row in self.rows if row.bits == bits and row.sparsity == sparsity]
        return sorted(chosen, key=lambda item: -math.inf if math.isnan(item[1]) else -item[1])  # nan: broke the model

    def table(self) -> str:
        """The console table (deltas to 4 significant digits)."""
        what = f"mean loss {self.baseline:.4g}" if self.reference == "loss" else "KL to the float outputs"
        title = f"sensitivity: delta over the float model ({what}, {self.batches} batches)"
        rows = [[r.layer, r.type, r.params, "float" if r.bits is None else r.bits, f"{r.sparsity:g}", f"{r.delta:+.4g}"]
                for r in self.rows]
        return format_table(title, COLUMNS, rows)

    def csv_text(self) -> str:
        """The rows as CSV with a header (``bits`` empty on pruning rows, deltas in full)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in self.rows:
            writer.writerow(["" if value is None else repr(value) if isinstance(value, float) else value
                             for value in row.values()])
        return out.getvalue()

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`csv_text` to ``path`` (atomically); returns the path."""
        atomic_write_bytes(path, self.csv_text().encode())
        return Path(path)

    def log(self, target: Any, key: str = TABLE_KEY) -> None:
        """Log the rows as one table (a ``wandb.Table`` under ``key``) to a Trainer's loggers
        that take tables, or to one logger with ``log_table`` (``WandbLogger``)."""
        from lightning_compress.core.tracking import log_table

        rows = [list(row.values()) for row in self.rows]
        if hasattr(target, "loggers"):
            log_table(target, key, COLUMNS, rows)
        elif callable(getattr(target, "log_table", None)):
            target.log_table(key=key, columns=list(COLUMNS), data=rows)
        else:
            raise TypeError(f"cannot log a table to {type(target).__name__}: pass a Trainer or a logger with log_table")

    def plot(self, path: str | os.PathLike) -> bool:
        """Save a bar chart of the deltas (one group of bars per layer) to ``path``;
        returns False, writing nothing, when matplotlib is not installed (it is optional)."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        cases = [("bits", b) for b in self.bits] + [("sparsity", s) for s in self.sparsities]
        layers = list(self.layers)
        width = 0.8 / max(len(cases), 1)
        figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(layers) + 2), 4.5))
        try:
            for i, (kind, value) in enumerate(cases):
                deltas = [self.delta(layer, bits=value) if kind == "bits" else self.delta(layer, sparsity=value)
                          for layer in layers]
                label = f"int{value}" if kind == "bits" else f"{value:g} sparse"
                axes.bar([x + (i - (len(cases) - 1) / 2) * width for x in range(len(layers))], deltas, width, label=label)
            axes.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=8)
            axes.set_yscale("symlog", linthresh=_linear_threshold(row.delta for row in self.rows))
            axes.set_ylabel("delta loss" if self.reference == "loss" else "KL to float")
            axes.set_title("per-layer sensitivity (each layer compressed alone)")
            axes.legend()
            figure.tight_layout()
            atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
        finally:
            plt.close(figure)
        return True


def _linear_threshold(deltas: Sequence[float] | Any) -> float:
    """The symlog axis is linear below the smallest nonzero |delta| (at least 1e-12)."""
    nonzero = [abs(d) for d in deltas if d]
    return max(min(nonzero), 1e-12) if nonzero else 1.0


__all__ = ["SensitivityRow", "SensitivityReport", "COLUMNS", "TABLE_KEY"]
