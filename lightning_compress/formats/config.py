"""Export settings, validated once: the arguments of :class:`lightning_compress.CompressedExport`."""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from torch import Tensor

from lightning_compress.core.filesystem import user_path
from lightning_compress.core.validate import (
    ArgumentError,
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_name,
    check_number,
)
from lightning_compress.formats.gguf_vocab import check_tokenizer
from lightning_compress.formats.runtime import BACKENDS

ONNX_ACTIVATIONS = ("float", "int8")  # what model.onnx's integer layers compute from


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
    dry_export: bool = True
    input_fn: Optional[Callable[[Any], Any]] = None
    max_relative_error: float = 1e-5
    min_sqnr_db: float = 35.0
    backend: str = "auto"
    sparse_threshold: Optional[float] = 0.3
    compressed_tensors: Optional[bool] = None
    recipe: Optional[Dict[str, Any]] = None
    formats: Sequence[str] = ("safetensors",)
    tokenizer: Any = None
    onnx_activations: str = "float"
    onnx_dynamic_sequence: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dirpath, (str, os.PathLike)) or not str(self.dirpath):
            raise ArgumentError("dirpath", f"`dirpath` must be a directory path, got {self.dirpath!r}")
        check_name("module", self.module, what="an attribute path such as 'model'")
        check_bool("overwrite", self.overwrite)
        check_bool("parity", self.parity)
        check_int("parity_batches", self.parity_batches)
        if not isinstance(self.dry_export, bool):
            raise ArgumentError(
                "dry_export", f"`dry_export` must be True (check the export on the first batch, before training) or"
                f" False (skip that check), got {self.dry_export!r}; e.g. dry_export=False (in a recipe:"
                " export.dry_export=false)"
            )
        check_callable("input_fn", self.input_fn, what="a callable taking a batch and returning the model's inputs")
        if self.recipe is not None and not isinstance(self.recipe, Mapping):
            raise ArgumentError("recipe", f"`recipe` must be a dict, got {type(self.recipe).__name__}")
        validate_export_options(
            self.backend, self.sparse_threshold, self.max_relative_error, self.min_sqnr_db, None, self.compressed_tensors
        )
        onnx = isinstance(self.formats, (list, tuple)) and "onnx" in self.formats
        validate_export_formats(self.formats, [None] if onnx else None, self.tokenizer, self.onnx_activations,
                                self.onnx_dynamic_sequence)
        object.__setattr__(self, "dirpath", user_path(self.dirpath, "dirpath"))  # ~ expanded, as ModelCheckpoint's
        object.__setattr__(self, "formats", tuple(self.formats))

    def export_options(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`lightning_compress.export` these settings give."""
        return dict(
            overwrite=self.overwrite, parity=self.parity, max_relative_error=self.max_relative_error,
            min_sqnr_db=self.min_sqnr_db, backend=self.backend, sparse_threshold=self.sparse_threshold,
            compressed_tensors=self.compressed_tensors, recipe=self.recipe, formats=self.formats,
            tokenizer=self.tokenizer, onnx_activations=self.onnx_activations,
            onnx_dynamic_sequence=self.onnx_dynamic_sequence,
        )


def validate_export_formats(formats, inputs, tokenizer=None, onnx_activations="float",
                            onnx_dynamic_sequence=False, model=None) -> None:
    """Check :func:`export`'s ``formats``, that ``inputs`` can trace an ONNX export of
    ``model`` (pass ``[None]`` for inputs that will exist by export time), the GGUF
    ``tokenizer``, ``onnx_activations`` and ``onnx_dynamic_sequence``.

    Raises:
        ArgumentError: a ``ValueError`` naming ``formats``, ``inputs`` or ``tokenizer``.
    """
    known = ("safetensors", "onnx", "gguf")
    if isinstance(formats, str) or not isinstance(formats, Sequence) or not all(f in known for f in formats if isinstance(f, str)) \
            or not all(isinstance(f, str) for f in formats):
        raise ArgumentError("formats", f"`formats` must be a list from {list(known)}, got {formats!r}")
    if "safetensors" not in formats:
        raise ArgumentError("formats", "`formats` must include 'safetensors' (the loader and the parity check read it)")
    if "onnx" in formats and not inputs:
        raise ArgumentError(
            "inputs", f"formats={list(formats)!r} includes 'onnx', which traces the model with `inputs[0]`: pass"
            " `inputs` with a tensor or a tuple of tensors")
    if "onnx" in formats and model is not None and not _takes_positional(model):
        raise ArgumentError(
            "inputs", f"formats={list(formats)!r} includes 'onnx', which traces the model with positional inputs,"
            f" but {type(model).__name__}.forward takes keyword arguments only: export a submodule whose forward"
            " takes them positionally (CompressedExport(module=...), e.g. module='model' for a transformers model"
            " held as self.model; or export(model.<submodule>, ...)), or leave 'onnx' out of `formats`")
    if "onnx" in formats and isinstance(inputs[0], Mapping):
        # CompressedExport's default input_fn makes keyword arguments of a dict batch only when
        # a parameter between its keys has a default other than None.
        first = next(iter(inputs[0]), "input_ids")  # inputs[0] is a dict the user gave: it may be empty
        raise ArgumentError(
            "inputs", f"formats={list(formats)!r} includes 'onnx', which traces the model with positional inputs,"
            f" but the inputs are keyword arguments ({', '.join(map(str, inputs[0]))}). Pass a tuple in forward's"
            " parameter order, with the values of the parameters between them (None where they default to None):"
            f" CompressedExport(input_fn=lambda batch: (batch[{first!r}], ...)), or export(inputs=[...]) with such"
            " tuples")
    check_choice("onnx_activations", onnx_activations, ONNX_ACTIVATIONS)
    if onnx_activations != "float" and "onnx" not in formats:
        raise ArgumentError(
            "onnx_activations", f"`onnx_activations={onnx_activations!r}` sets how model.onnx computes: add 'onnx' to"
            " `formats`, or drop it")
    check_bool("onnx_dynamic_sequence", onnx_dynamic_sequence)
    if onnx_dynamic_sequence and "onnx" not in formats:
        raise ArgumentError(
            "onnx_dynamic_sequence", "`onnx_dynamic_sequence=True` makes model.onnx take any sequence length: add"
            " 'onnx' to `formats`, or drop it")
    if "gguf" in formats:
        check_tokenizer(tokenizer)
        if importlib.util.find_spec("gguf") is None:
            raise ArgumentError(
                "formats", "formats=['gguf'] needs the `gguf` package: pip install 'lightning-compress[gguf]'")
    elif tokenizer is not None:
        raise ArgumentError(
            "tokenizer", "`tokenizer` is the vocabulary of model.gguf: add 'gguf' to `formats`, or drop it")


def validate_export_options(
    backend, sparse_threshold, max_relative_error, min_sqnr_db, inputs, compressed_tensors
) -> None:
    """Check the options of :func:`export` (``inputs=None`` skips that one), so a caller
    that exports later (``CompressedExport``) can refuse them before training.

    Raises:
        ArgumentError: a ``ValueError`` naming the bad argument (its ``argument``).
    """
    check_choice("backend", backend, BACKENDS)
    if sparse_threshold is not None:
        check_number("sparse_threshold", sparse_threshold, low=0.0, high=1.0, what="a fraction in [0, 1] or None")
    check_number("max_relative_error", max_relative_error, low=0.0, what="a number >= 0")
    check_number("min_sqnr_db", min_sqnr_db, what="a number (dB)")
    if inputs is not None and (isinstance(inputs, (Tensor, Mapping)) or not isinstance(inputs, Sequence)):
        raise ArgumentError("inputs", "`inputs` must be a list of batches (e.g. [x1, x2]), not a single tensor or dict")
    if compressed_tensors is not None and not isinstance(compressed_tensors, bool):
        raise ArgumentError(
            "compressed_tensors", f"`compressed_tensors` must be True, False or None, got {compressed_tensors!r}"
        )


def _takes_positional(model) -> bool:
    """Whether ``model.forward`` has a parameter a positional input can fill."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the trace say
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


__all__ = ["ExportConfig", "validate_export_formats", "validate_export_options"]
