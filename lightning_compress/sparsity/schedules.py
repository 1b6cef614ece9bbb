"""Sparsity schedules (pure functions of the optimizer step; no Lightning here)."""

from __future__ import annotations

import warnings
from typing import Callable

from lightning_compress.core.schedule import StepLike, resolve_step
from lightning_compress.core.validate import ArgumentError

SCHEDULES = ("cubic", "linear", "one_shot")


def schedule_window(start_step: StepLike, end_step: StepLike, total_steps: float, *, one_shot: bool,
                    final_sparsity: float, warn: Callable[[str], None] = warnings.warn,
                    length: float | None = None) -> tuple[int, int]:
    """The optimizer steps the schedule starts and ends at in a run of ``total_steps``,
    fractions resolved against ``length`` (default ``total_steps``; a resumed run's
    :class:`~lightning_compress.core.schedule.RunLength`); ``warn`` (Lightning's
    ``rank_zero_warn`` under DDP) says where it will not run as set.

    Raises:
        ArgumentError: a fraction made ``end_step`` resolve before ``start_step``.
    """
    length = total_steps if length is None else length
    start = resolve_step("start_step", start_step, length)
    end = resolve_step("end_step", end_step, length)
    if one_shot:
        return start, start
    if end == start and isinstance(end_step, float) and (isinstance(start_step, float) or start_step == 0):
        # Fractions of a run too short to tell the two steps apart (`fast_dev_run`): a smoke
        # test still runs, with the ramp over one step. (An int start_step that a fractional
        # end_step reaches no later is a setting that does not fit the run: refused below.)
        warn(
            f"MagnitudePruning: this run of {length} steps is too short for `start_step`={start_step} and"
            f" `end_step`={end_step}: both resolve to step {start}, so the schedule ramps from step {start} to"
            f" step {start + 1}"
        )
        return start, start + 1
    if end <= start:
        raise ArgumentError(
            "end_step",
            f"`end_step` resolves to step {end}, not after `start_step` (step {start}) in this run of {length}"
            " steps; move `end_step` later",
        )
    if end > total_steps:
        warn(
            f"MagnitudePruning: `end_step` is step {end} but the run has {total_steps} optimizer steps;"
            f" `final_sparsity`={final_sparsity} will not be reached."
        )
    return start, end


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
