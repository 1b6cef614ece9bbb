"""Checkpoint state of the callbacks."""

from __future__ import annotations

from typing import Any, Mapping

STATE_VERSION = 1


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
