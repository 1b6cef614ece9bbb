"""The exceptions the export and the packed-model loader raise."""

from __future__ import annotations


class PackedFormatError(ValueError):
    """A packed directory cannot be read: missing, truncated or corrupted files, an unknown
    format version, or tensors that do not fit the given model. The message names the
    file and, where one is at fault, the tensor or layer."""


class ExportError(RuntimeError):
    """The export refused to write: NaN/Inf in a weight, an existing directory without
    ``overwrite=True``, or a layer it cannot pack. Nothing on disk was changed."""


class ParityError(ExportError):
    """The packed model does not compute what the fake-quant model computes, beyond the
    thresholds. ``report`` holds the figures, worst layers first. Nothing was written."""

    def __init__(self, message: str, report) -> None:
        super().__init__(message)
        self.report = report
