"""Per-layer reports: one table per callback, never one panel per layer.

Scalars go through ``pl_module.log`` so every Lightning logger receives them; a
per-layer table goes to loggers that have tables (W&B's ``log_table``) and is printed on
rank zero, because a dashboard with hundreds of per-layer panels is unreadable.
"""

from __future__ import annotations

from typing import Any, Sequence

from lightning.pytorch.utilities import rank_zero_info


def format_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([title, line, "-" * len(line), *body])


def report_table(trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Send a table to every logger that takes tables and print it once."""
    for logger in trainer.loggers:
        log_table = getattr(logger, "log_table", None)
        if callable(log_table) and trainer.is_global_zero:
            log_table(key=key, columns=list(columns), data=[list(r) for r in rows])
    rank_zero_info(format_table(key, columns, rows))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
