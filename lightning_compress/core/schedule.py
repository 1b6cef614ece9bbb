"""Step arguments: absolute optimizer steps or fractions of the run.

Every schedule in lightning-compress counts optimizer steps (``trainer.global_step``),
so it is right under gradient accumulation and continues exactly after a resume. A
step argument is either an ``int`` (an absolute step) or a ``float`` in ``[0, 1]`` (a
fraction of ``trainer.estimated_stepping_batches``).
"""

from __future__ import annotations

import math
from typing import Union

from lightning_compress.core.validate import ArgumentError

StepLike = Union[int, float]


def validate_step(argument: str, value: StepLike) -> StepLike:
    """Check a step argument at ``__init__`` time; returns it unchanged.

    Raises:
        ArgumentError: naming ``argument`` when the value is not a non-negative int or a
            float in ``[0, 1]``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ArgumentError(argument, 
            f"`{argument}` must be an int (optimizer step) or a float in [0, 1] (fraction of"
            f" the run), got {value!r}"
        )
    if isinstance(value, int) and value < 0:
        raise ArgumentError(argument, f"`{argument}` must be >= 0, got {value}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ArgumentError(argument, 
            f"`{argument}`={value} is a float, so it is read as a fraction of the run and must"
            f" lie in [0, 1]; pass an int for an absolute step (e.g. {int(value)})"
        )
    return value


def steps_are_ordered(start: StepLike, end: StepLike) -> bool | None:
    """Whether ``start < end`` when both are the same kind; ``None`` if that needs the run."""
    if isinstance(start, float) == isinstance(end, float):
        return start < end
    return None


def resolve_step(argument: str, value: StepLike, total_steps: float) -> int:
    """Turn a step argument into an absolute optimizer step for this run.

    Args:
        total_steps: ``trainer.estimated_stepping_batches``.

    Raises:
        ValueError: a fraction was given but the run's length is unknown (infinite).
    """
    if isinstance(value, int):
        return value
    if not math.isfinite(total_steps):
        raise ValueError(
            f"`{argument}`={value} is a fraction of the run, but this run's length is unknown"
            " (no max_steps/max_epochs, or an iterable dataset without length). Pass an"
            " absolute step (int) instead."
        )
    return int(round(value * total_steps))
