"""Export settings, validated once: the arguments of :class:`lightning_compress.CompressedExport`."""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from lightning_compress.core.validate import ArgumentError, check_bool, check_callable, check_int, check_name
from lightning_compress.formats.export import validate_export_formats, validate_export_options


@dataclass(frozen=True)
class ExportConfig:
    """Where and how to export. See :class:`lightning_compress.CompressedExport` for the
    meaning of each field; every field is checked when the config is built, with the
    same checks :func:`lightning_compress.export` makes, so a bad option fails before
    training rather than after it.

    Raises:
        ArgumentError: naming the bad field.
    """

    dirpath: str | os.PathLike
    _: KW_ONLY
    module: Optional[str] = None
    overwrite: bool = False
    parity: bool = True
    parity_batches: int = 2
    input_fn: Optional[Callable[[Any], Any]] = None
    max_relative_error: float = 1e-5
    min_sqnr_db: float = 35.0
    backend: str = "auto"
    sparse_threshold: Optional[float] = 0.3
    compressed_tensors: Optional[bool] = None
    recipe: Optional[Dict[str, Any]] = None
    formats: Sequence[str] = ("safetensors",)

    def __post_init__(self) -> None:
        if not isinstance(self.dirpath, (str, os.PathLike)) or not str(self.dirpath):
            raise ArgumentError("dirpath", f"`dirpath` must be a directory path, got {self.dirpath!r}")
        check_name("module", self.module, what="an attribute path such as 'model'")
        check_bool("overwrite", self.overwrite)
        check_bool("parity", self.parity)
        check_int("parity_batches", self.parity_batches)
        check_callable("input_fn", self.input_fn, what="a callable taking a batch and returning the model's inputs")
        if self.recipe is not None and not isinstance(self.recipe, Mapping):
            raise ArgumentError("recipe", f"`recipe` must be a dict, got {type(self.recipe).__name__}")
        validate_export_options(
            self.backend, self.sparse_threshold, self.max_relative_error, self.min_sqnr_db, None, self.compressed_tensors
        )
        onnx = isinstance(self.formats, (list, tuple)) and "onnx" in self.formats
        validate_export_formats(self.formats, [None] if onnx else None)
        object.__setattr__(self, "dirpath", Path(self.dirpath))
        object.__setattr__(self, "formats", tuple(self.formats))

    def export_options(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`lightning_compress.export` these settings give."""
        return dict(
            overwrite=self.overwrite, parity=self.parity, max_relative_error=self.max_relative_error,
            min_sqnr_db=self.min_sqnr_db, backend=self.backend, sparse_threshold=self.sparse_threshold,
            compressed_tensors=self.compressed_tensors, recipe=self.recipe, formats=self.formats,
        )


__all__ = ["ExportConfig"]
