"""Shared argument validators: one wording, and the argument's name carried as data.

Every config (and so every callback) checks its arguments with these. The error is an
:class:`ArgumentError`, a ``ValueError`` whose ``argument`` attribute names what was
wrong, so a recipe maps it to its key (``qat.group_size``) without reading the message.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch


class ArgumentError(ValueError):
    """A bad argument. ``argument`` is its name (``"final_sparsity"``); the message says
    what was expected and how to fix it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


def plain_values(value: Any) -> Any:
    """``value`` with NumPy scalars (in lists, tuples and dicts too) turned into the Python
    int, float, bool or str they hold: ``np.int64(10)`` is a step count to a user, but
    ``isinstance(np.int64(10), int)`` is False, so the validators refused it. Applied to a
    callback's arguments (not to a config built directly)."""
    if isinstance(value, np.generic):
        return value.item()
    if type(value) is dict:
        return {plain_values(key): plain_values(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain_values(item) for item in value)
    return value


def is_number(value: Any) -> bool:
    """An int or float that is not a bool (``True`` is an int to Python, not to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bool(argument: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(argument, f"`{argument}` must be True or False, got {value!r}")
    return value


def check_int(argument: str, value: Any, *, minimum: int = 1, what: str | None = None) -> int:
    """An int ``>= minimum``; ``what`` replaces "a positive int" in the message."""
    if not is_int(value) or value < minimum:
        expected = what or ("a positive int" if minimum == 1 else f"an int >= {minimum}")
        raise ArgumentError(argument, f"`{argument}` must be {expected}, got {value!r}")
    return value


def check_number(
    argument: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    what: str | None = None,
) -> float:
    """A finite number in the range given by ``low``/``high`` (open ends where asked);
    returned as a float. ``what`` replaces the generated description in the message."""
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ArgumentError(argument, f"`{argument}` must be {what or _describe_range(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def check_positive(argument: str, value: Any, *, what: str = "a positive number") -> float:
    return check_number(argument, value, low=0.0, low_open=True, what=what)


def check_fraction(argument: str, value: Any) -> float:
    """A number in ``[0, 1)``: a sparsity, a dropout probability."""
    return check_number(argument, value, low=0.0, high=1.0, high_open=True)


def check_choice(argument: str, value: Any, choices: Sequence[Any], *, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not _hashable_member(value, choices):
        options = f"None or one of {tuple(choices)}" if allow_none else f"one of {tuple(choices)}"
        raise ArgumentError(argument, f"unknown `{argument}` {value!r}; choose {options}")
    return value


def check_callable(argument: str, value: Any, *, what: str, allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    if not callable(value):
        raise ArgumentError(argument, f"`{argument}` must be {what}, got {value!r}")
    return value


def check_module(argument: str, value: Any, *, what: str = "an nn.Module (a LightningModule)") -> Any:
    """An ``nn.Module`` instance (a class or ``None`` failed deep inside otherwise)."""
    import torch.nn as nn

    if not isinstance(value, nn.Module):
        hint = "; pass an instance, not the class" if isinstance(value, type) else ""
        raise ArgumentError(argument, f"`{argument}` must be {what}, got {type(value).__name__} {value!r}{hint}")
    return value


def check_name(argument: str, value: Any, *, what: str, allow_none: bool = True) -> str | None:
    """A non-empty string such as a module name."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ArgumentError(argument, f"`{argument}` must be {what}, got {value!r}")
    return value


def _hashable_member(value: Any, choices: Sequence[Any]) -> bool:
    try:
        return any(value == choice and type(value) is type(choice) for choice in choices)
    except Exception:  # a value whose == raises (an array) is not a choice
        return False


def _describe_range(low, high, low_open, high_open) -> str:
    if low is None and high is None:
        return "a number"
    if high is None:
        return "a positive number" if (low == 0 and low_open) else f"a number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def dtype_spelled(value: Any) -> Any:
    """``torch.bfloat16`` (or ``"torch.bfloat16"``) as ``"bfloat16"``, the spelling recipes
    use; any other value as it is, for the caller to check."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value.removeprefix("torch.") if isinstance(value, str) else value


def dtype_of(value: Any) -> Any:
    """``"bfloat16"`` (or ``"torch.bfloat16"``) as ``torch.bfloat16``; any other value as it
    is, for the caller to check."""
    found = getattr(torch, dtype_spelled(value), None) if isinstance(value, str) else None
    return found if isinstance(found, torch.dtype) else value


__all__ = [
    "dtype_spelled",
    "dtype_of",
    "ArgumentError",
    "plain_values",
    "is_number",
    "is_int",
    "check_bool",
    "check_int",
    "check_number",
    "check_positive",
    "check_fraction",
    "check_choice",
    "check_callable",
    "check_name",
]
