"""core.notes.add_note: the note an error carries, on Python 3.11+ and on 3.10 (no add_note)."""

import pytest

from lightning_compress.core.notes import add_note


class WithoutAddNote(ValueError):
    """An exception as Python 3.10 makes them: no ``add_note``."""

    @property
    def add_note(self):
        raise AttributeError("add_note")


def test_a_note_is_added_on_311_and_kept_and_warned_on_310():
    error = ValueError("x")
    add_note(error, "first")
    add_note(error, "second")
    assert error.__notes__ == ["first", "second"]

    old = WithoutAddNote("y")
    assert not hasattr(old, "add_note")
    with pytest.warns(RuntimeWarning, match="^what to do$"):
        add_note(old, "what to do")
    assert old.__notes__ == ["what to do"]
