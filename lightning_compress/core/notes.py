"""Notes on an exception: what the library knows about an error it lets through."""

from __future__ import annotations

import warnings
from typing import List


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``. Python 3.10 has no ``add_note``: the note goes into the same
    list (``__notes__``, which the command line reads) and, since 3.10's tracebacks do not
    print that list, out as a warning too."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]
        warnings.warn(note, RuntimeWarning, stacklevel=3)


def first_four(items: List[str]) -> List[str]:
    """``items`` to name in a message: the first four, then how many more."""
    return items[:4] + ([f"{len(items) - 4} more"] if len(items) > 4 else [])


__all__ = ["add_note", "first_four"]
