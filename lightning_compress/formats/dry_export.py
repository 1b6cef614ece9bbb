"""A dry export: what :func:`~lightning_compress.export` does, on the model as it is now,
in memory, writing nothing.

``CompressedExport`` runs it before the first training step, so a model the format cannot
store, a loader kernel that fails, a parity threshold the packed model cannot meet or an
ONNX graph that does not trace stops the run before training instead of after the last
step, with the error the export at the end would raise.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_compress.core.recompute import export_checks
from lightning_compress.formats.config import validate_export_formats, validate_export_options
from lightning_compress.formats.devices import on_the_cpu
from lightning_compress.formats.errors import ParityError
from lightning_compress.formats.export import ExportReport, check_packing, pack
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE, decode_packed
from lightning_compress.formats.parity import ParityReport, preserved_ranges


@export_checks()  # its forwards are not training forwards, even inside a training batch
def dry_export(
    model: nn.Module,
    inputs: Sequence[Any] = (),
    *,
    parity: bool = True,
    max_relative_error: float = 1e-5,
    min_sqnr_db: float = 35.0,
    backend: str = "auto",
    sparse_threshold: Optional[float] = 0.3,
    compressed_tensors: Optional[bool] = None,
    recipe: Optional[Mapping[str, Any]] = None,
    formats: Sequence[str] = ("safetensors",),
    overwrite: bool = False,
    tokenizer: Any = None,
    onnx_activations: str = "float",
    onnx_dynamic_sequence: bool = False,
) -> ExportReport:
    """Pack ``model``, decode the packed bytes back from memory, run the parity check on
    ``inputs`` and, with ``"onnx"`` in ``formats``, export and run ``model.onnx`` (with
    ``"gguf"``, write and read back ``model.gguf``) in a temporary folder of the system's
    (removed after). The options are :func:`export`'s
    (``overwrite`` is accepted and ignored: no directory is written).

    Two differences from the export, for what training has not decided yet: static int8
    activations that are not calibrated yet are checked as weight-only layers, and an
    int8-GEMM SQNR under ``min_sqnr_db`` (when the weights and the exact path pass) is a
    warning, since it depends on the trained weights; every other failure raises.

    The model is left as it was: weights, train/eval modes, quantizer ranges (those a
    measurement would choose are put back, as the parity check does) and the random
    number generators (torch's CPU and CUDA ones, ``random``, ``numpy``).

    Cost: one packing of the model, as the export does it but without the disk (peak
    memory: the packed bytes and their decoded copy), then the parity check's forwards
    on ``inputs``, in eval mode without gradients: the fake-quant model, the exact path,
    the int8 path when a layer runs it, and each packed layer once more on its recorded
    input (the inputs and outputs of every packed layer are held meanwhile); for ONNX,
    one trace, one file in the temporary folder and one onnxruntime run; for GGUF, the
    blocks encoded again, written there and read back with ``gguf``. Measured on a
    16.8M-parameter MLP (int4, groups of 128, a batch of 32, one CPU thread): 2.8 s, the
    time of about 3 training steps.

    Raises:
        ExportError, ParityError, ArgumentError: as :func:`export` raises them for the
            same model and options (a :class:`ParityError` has ``directory=None``: nothing
            is kept), and whatever the ONNX export raises.
    """
    inputs = list(inputs)
    with on_the_cpu(model) as moved:  # where the export at the end of fit checks (see on_the_cpu)
        inputs = move_data_to_device(inputs, "cpu") if moved else inputs
        validate_export_options(backend, sparse_threshold, max_relative_error, min_sqnr_db, inputs, compressed_tensors)
        validate_export_formats(formats, inputs, tokenizer, onnx_activations, onnx_dynamic_sequence, model)
        with preserved_rng(), preserved_ranges(model):
            packing = pack(model, Path("(dry export)"), sparse_threshold=sparse_threshold,
                           compressed_tensors=compressed_tensors, recipe=recipe, dry=True, formats=formats,
                           tokenizer=tokenizer)
            packed = None
            if parity:  # read back as `read_packed` reads a directory, from the bytes in memory
                metadata = json.loads(packing.files[METADATA_FILE])
                metadata.pop("metadata_sha256", None)
                packed = decode_packed(metadata, packing.files[WEIGHTS_FILE], f"{WEIGHTS_FILE} (dry export, in memory)")
            options = dict(backend=backend, max_relative_error=max_relative_error, min_sqnr_db=min_sqnr_db, formats=formats,
                           onnx_activations=onnx_activations, onnx_dynamic_sequence=onnx_dynamic_sequence)
            writes = {"onnx", "gguf"} & set(formats)  # model.onnx, model.gguf: written and read back
            onnx_folder = tempfile.TemporaryDirectory(prefix="lightning-compress-dry-") if writes else None
            with onnx_folder or contextlib.nullcontext() as folder:
                try:
                    check_packing(model, packing, packed, inputs, Path(folder or "."), parity=parity, **options)
                except ParityError as error:
                    # model.onnx with rounded activations: its parity passed, the ONNX check came after.
                    onnx_missed = error.onnx_sqnr_missed
                    if not (onnx_missed or _only_the_int8_gemm_missed(error.report)):
                        raise
                    what = "model.onnx's SQNR" if onnx_missed else "The int8 GEMM's SQNR"
                    warnings.warn(
                        f"dry export before training: {error}. {what} depends on the trained weights, so training"
                        " goes on; the export at the end checks it again", UserWarning, stacklevel=2)
                    rest = dict(options, formats=[f for f in formats if f != "onnx"]) if onnx_missed else options
                    check_packing(model, packing, packed, inputs, Path(folder or "."), parity=False, **rest)
        return packing.report


def _only_the_int8_gemm_missed(report: Optional[ParityReport]) -> bool:
    """Whether the weights and the exact path passed and only the int8 GEMM's SQNR (which
    depends on the weights training will change) missed its threshold."""
    if report is None or not report.weights_exact or report.sqnr_db is None:
        return False
    return report.relative_error is None or report.relative_error <= report.max_relative_error


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Put back the state of torch's CPU (and initialised CUDA) generators, ``random``'s
    and ``numpy``'s on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    python_state = random.getstate()
    try:
        import numpy
    except ImportError:  # numpy is optional for torch
        numpy = None
    numpy_state = None if numpy is None else numpy.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


__all__ = ["dry_export", "preserved_rng"]
