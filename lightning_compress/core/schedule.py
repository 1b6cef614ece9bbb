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


class RunLength:
    """The run length a callback's fractions resolve against, kept in its checkpoints.

    A resumed run keeps the length of the run it resumes: a resume with more (or fewer)
    epochs continues the schedule it was on. Resolved against the new length, a pruning
    window of 0.1-0.6 would start over further on (its masks released until the schedule
    caught up) and QAT switch back to float until its start came round again.
    """

    def __init__(self) -> None:
        self.total: float | None = None  # None until this fit decides it (or a checkpoint gives it)

    def begin(self, stage: str) -> None:
        """A new fit decides its own length (unless its checkpoint gives one); a
        ``validate``/``test`` between fits keeps it for the checkpoints saved after."""
        if stage == "fit":
            self.total = None

    def state(self) -> dict:
        """``{"total_steps": ...}`` for a checkpoint, once a step resolved against it."""
        return {} if self.total is None else {"total_steps": self.total}

    def load(self, owner: str, total) -> None:
        """Take a checkpoint's ``total_steps`` (absent, ``None``, from checkpoints written
        before it was kept: this run's length is used then).

        Raises:
            ValueError: it is not a number.
        """
        if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float))):
            raise ValueError(f"the checkpoint's {owner} state is malformed (`total_steps` {total!r} is not a number);"
                             " it was edited or written by something else; resume from a checkpoint this run wrote")
        self.total = total

    def resolve(self, trainer, owner: str, fractions: dict) -> float:
        """The length to resolve ``fractions`` (``{argument: value}``, the fractional step
        arguments) against: the checkpoint's, with a warning where a step would resolve
        elsewhere in this run's; else this run's, kept from now on. Without fractions
        nothing depends on it, and nothing is kept."""
        now = trainer.estimated_stepping_batches
        if not fractions:
            return now
        if self.total is None:
            self.total = now
        elif self.total != now and math.isfinite(now):
            kept = {name: int(round(value * self.total)) for name, value in fractions.items()}
            moved = {name: step for name, step in kept.items() if step != int(round(fractions[name] * now))}
            if moved:
                from lightning.pytorch.utilities import rank_zero_warn

                given = ", ".join(f"`{name}`={fractions[name]} at step {step}" for name, step in moved.items())
                rank_zero_warn(
                    f"{owner}: this run has {now} optimizer steps, the run it resumes had {self.total}; {given}"
                    f" {'stays where it' if len(moved) == 1 else 'stay where they'} resolved in that run, so the"
                    " schedule continues where it was (to lay it out over the new length, start a new run from the"
                    " checkpoint's weights)"
                )
        return self.total


def fractional_steps(config, arguments) -> dict:
    """``{argument: value}`` of ``config``'s step ``arguments`` given as fractions of the run."""
    values = {name: getattr(config, name, None) for name in arguments}
    return {name: value for name, value in values.items() if isinstance(value, float)}
