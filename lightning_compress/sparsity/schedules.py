"""Sparsity schedules (pure functions of the optimizer step; no Lightning here)."""

from __future__ import annotations

SCHEDULES = ("cubic", "linear", "one_shot")


def scheduled_sparsity(
    step: int,
    *,
    initial: float,
    final: float,
    start: int,
    end: int,
    update_every: int,
    kind: str = "cubic",
) -> float | None:
    """Target sparsity at optimizer step ``step``, or ``None`` before ``start``.

    ``cubic`` is Zhu & Gupta (2017), "To prune, or not to prune":
    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3`` for
    ``t in {t0, t0 + dt, ..., t0 + n * dt}``; between updates the value holds, so the
    mask changes only every ``update_every`` steps, and from ``end`` on it is ``final``.
    ``linear`` interpolates on the same update grid; ``one_shot`` jumps to ``final`` at
    ``start``.
    """
    if step < start:
        return None
    if kind == "one_shot" or step >= end:
        return final
    # Snap to the last update point so the target is piecewise constant between updates.
    t = start + ((step - start) // update_every) * update_every
    progress = (t - start) / (end - start)
    if kind == "cubic":
        return final + (initial - final) * (1.0 - progress) ** 3
    if kind == "linear":
        return initial + (final - initial) * progress
    raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
