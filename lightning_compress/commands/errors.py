"""Errors of the ``lightning-compress`` command."""

from __future__ import annotations


class CommandError(Exception):
    """Bad input on the command line: printed as one paragraph, exit code 2."""


__all__ = ["CommandError"]
