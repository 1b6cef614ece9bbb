"""Per-layer reports: one table for the whole compressed model, never one panel per layer.

Scalars go through ``pl_module.log`` so every Lightning logger receives them; the
per-layer table goes to loggers that have tables (W&B's ``log_table``) and is printed on
rank zero, because a dashboard with hundreds of per-layer panels is unreadable.

The table is read from the transform stack of the module, not from any one callback, so
it describes whatever combination of methods is attached. Each stage, on a weight or on
the layer's input, contributes its columns through a ``table_fields()`` method
returning ``{column: value}``. The ``skipped`` column names the methods that left a layer
out (``on_incompatible="skip"``, or a grouped convolution a method cannot compress): such
a layer has a row even when no method compresses it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_compress.core.targeting import layer_weights
from lightning_compress.core.tracking import log_table
from lightning_compress.core.transforms import INPUT, Stage, all_transforms, transformed_slots, weight_before

LAYER_TABLE_KEY = "compression/layers"
LAYER_COLUMNS = (
    "layer", "type", "params", "sparsity", "weight_bits", "granularity", "activation_bits", "lora_rank", "skipped"
)
# A column no stage fills: the layer computes in float there (bits), has no adapter, or
# was left out by no method.
_DEFAULTS = {"weight_bits": 32, "granularity": "float", "activation_bits": 32, "lora_rank": 0, "skipped": ""}
_PENDING = "_lc_layer_table_pending"


def format_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([title, line, "-" * len(line), *body])


def report_table(trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Send a table to every logger that takes tables and print it once."""
    log_table(trainer, key, columns, rows)
    rank_zero_info(format_table(key, columns, rows))


def layer_rows(module: nn.Module, skipped: Mapping[str, Sequence[str]] | None = None) -> List[List[Any]]:
    """One row (in :data:`LAYER_COLUMNS` order) per layer under ``module`` that has a
    transform or is left out by a method (``skipped``: ``{layer name or weight key:
    methods that left it out}``); a layer with several weight matrices (a recurrent
    layer, whose matrices may each have their own grid) has one row per such matrix,
    keyed as QAT and the export key it (``rnn.weight_hh_l0``). ``params`` and ``sparsity``
    cover the row's weights; ``sparsity`` counts the zeros of the weights entering fake
    quantization: pruned weights, not weights that quantization rounds to zero."""
    skipped = skipped or {}
    rows = []
    for name, layer in module.named_modules():
        keys = layer_weights(name, layer)  # {weight key: parameter}: several for a recurrent layer
        transformed = [slot for slot in transformed_slots(layer) if slot != INPUT]
        if len(keys) > 1:
            groups = [([slot], key) for key, slot in keys.items() if slot in transformed or key in skipped or name in skipped]
        elif transformed or name in skipped:
            groups = [(transformed or [slot for slot, p in layer.named_parameters(recurse=False) if p.dim() > 1], name)]
        else:
            groups = []
        for slots, row_name in groups:
            fields: Dict[str, Any] = dict(_DEFAULTS)
            for slot, _, transform in all_transforms(layer):
                if slot == INPUT or slot in slots:
                    fields.update(_fields_of(transform))
            numel = zeros = 0
            for slot in slots:
                weight = weight_before(layer, Stage.FAKE_QUANT, slot).detach()
                numel, zeros = numel + weight.numel(), zeros + int((weight == 0).sum())
            methods = [*skipped.get(name, ()), *(skipped.get(row_name, ()) if row_name != name else ())]
            fields.update(layer=row_name, type=type(layer).__name__, params=numel, sparsity=zeros / max(numel, 1),
                          skipped=",".join(dict.fromkeys(methods)))
            rows.append([fields[column] for column in LAYER_COLUMNS])
    return rows


def expect_layer_table(trainer) -> None:
    """Called by every compression callback at fit start: this fit owes one layer table."""
    setattr(trainer, _PENDING, True)


def report_layer_table(trainer, pl_module: nn.Module, skipped: Mapping[str, Sequence[str]] | None = None) -> None:
    """Called by every compression callback first thing at fit end: the first call of the
    fit logs and prints the table (before any callback changes the model, e.g. merges
    LoRA); the others find it done. Nothing is logged for a model with no compressed or
    skipped layer. ``skipped``: ``{layer name: methods that left it out}``."""
    if not getattr(trainer, _PENDING, False):
        return
    setattr(trainer, _PENDING, False)
    rows = layer_rows(pl_module, skipped)  # on every rank: reading FSDP2 shards gathers them
    if rows and trainer.is_global_zero:
        report_table(trainer, LAYER_TABLE_KEY, LAYER_COLUMNS, rows)


def _fields_of(part: Any) -> Dict[str, Any]:
    table_fields = getattr(part, "table_fields", None)
    return dict(table_fields()) if callable(table_fields) else {}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
