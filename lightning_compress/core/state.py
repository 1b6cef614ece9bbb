"""Checkpoint state of the callbacks."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Dict, Mapping, Optional

STATE_VERSION = 1
# Where RecipeRecord keeps the resolved recipe in a checkpoint.
RECIPE_CHECKPOINT_KEY = "lightning_compress"


def check_state_version(owner: str, state: Mapping[str, Any]) -> None:
    """Refuse callback state written by a lightning-compress with another state layout.

    Raises:
        ValueError: naming the callback and both versions.
    """
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"{owner} state version {state.get('version')!r} is not {STATE_VERSION}; the"
            " checkpoint comes from another lightning-compress version"
        )


def recipe_in_checkpoint(checkpoint: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The recipe a checkpoint (a loaded dict) was trained with, or None."""
    record = checkpoint.get(RECIPE_CHECKPOINT_KEY)
    recipe = record.get("recipe") if isinstance(record, Mapping) else None
    return dict(recipe) if isinstance(recipe, Mapping) else None


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def plain_setting(value: Any) -> Any:
    """A setting as plain data, comparable after a checkpoint round trip."""
    if isinstance(value, type):
        return value.__qualname__
    if isinstance(value, (list, tuple)):
        return [plain_setting(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain_setting(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value) and hasattr(value, "__qualname__"):  # a function: where it is defined, not its address
        name = f"{getattr(value, '__module__', None)}.{value.__qualname__}"
        code = getattr(value, "__code__", None)
        if code is not None and "<" in value.__qualname__:  # a lambda or a local function: its name says little
            name += f"#{hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]}"
        return name
    return _ADDRESS.sub("", repr(value))  # (a repr naming an address would differ in every process)
