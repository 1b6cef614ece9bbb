"""The exceptions the export and the packed-model loader raise."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class PackedFormatError(ValueError):
    """A packed directory cannot be read: missing, truncated or corrupted files, an unknown
    format version, or tensors that do not fit the given model. The message names the
    file and, where one is at fault, the tensor or layer."""


def read_packed_file(path: Path) -> bytes:
    """The bytes of a file of a packed directory; an ``OSError`` reading it (permissions,
    an I/O error) becomes a :class:`PackedFormatError` naming the file."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise PackedFormatError(f"{path}: cannot be read ({error.strerror or error})") from None


class FailedExportError(PackedFormatError):
    """The directory holds an export whose check failed (``<dir>.failed-parity/``, kept so
    the run is not lost): ``load_packed`` refuses it unless ``allow_failed_parity=True``."""


class ExportError(RuntimeError):
    """The export refused to write: NaN/Inf in a weight, an existing directory without
    ``overwrite=True``, or a layer it cannot pack; nothing on disk was changed. Or the
    check of the packed files failed after packing: then ``directory`` is where they were
    kept instead (``<dir>.failed-parity/``, named in the message). Or the directory could not
    be written (a full disk, permissions): then ``directory`` is the new folder of the
    system's temporary directory the export was written to instead. ``None`` when the files
    could not be written anywhere."""

    def __init__(self, message: str, directory: Optional[Path] = None) -> None:
        super().__init__(message)
        self.directory = directory


class UnexportableModel(ExportError):
    """A format asked for cannot hold this model (PyTorch's ONNX exporter refuses an op,
    or an output that is not tensors): the packed files are not at fault, so none are kept
    as a failed check's are."""


class ParityError(ExportError):
    """The packed model does not compute what the fake-quant model computes, beyond the
    thresholds. ``report`` holds the figures, worst layers first (``None`` when the ONNX
    file failed its check). Nothing is written to the export directory; ``directory`` is
    the ``<dir>.failed-parity/`` sibling the packed files were kept in (see
    :mod:`lightning_compress.formats.failed_export`), ``None`` for a dry export.
    ``onnx_sqnr_missed``: the ONNX file, whose activations are rounded, missed
    ``min_sqnr_db`` (a figure that depends on the trained weights, as the int8 GEMM's)."""

    def __init__(self, message: str, report, directory: Optional[Path] = None, *,
                 onnx_sqnr_missed: bool = False) -> None:
        super().__init__(message, directory)
        self.report = report
        self.onnx_sqnr_missed = onnx_sqnr_missed
