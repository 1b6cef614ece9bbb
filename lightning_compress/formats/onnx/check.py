"""The ONNX file of an export, checked: what ``export(..., formats=[..., "onnx"])`` runs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

import torch
from torch import nn

from lightning_compress.core.attention import fast_path_disabled
from lightning_compress.core.targeting import module_name
from lightning_compress.core.validate import ArgumentError
from lightning_compress.formats.errors import ParityError
from lightning_compress.formats.onnx.io import export_onnx, graph_tensors, map_graph_tensors, run_onnx
from lightning_compress.formats.onnx.layouts import INTEGER_BITS, MATMUL_INTEGER, MATMUL_NBITS
from lightning_compress.formats.outputs import flatten_outputs, relative_error, sqnr_db
from lightning_compress.formats.parity import eval_mode, quantization_enabled


def export_and_check(model: nn.Module, layers: Mapping[str, Any], inputs: Sequence[Any], path: Path,
                     max_relative_error: float, min_sqnr_db: float, int8_activations: bool = False,
                     dynamic_sequence: bool = False) -> Dict[str, Any]:
    """Export ``model`` to ``path`` with the quantized ``layers``' codes (4- and 8-bit
    Linear layers), run it in onnxruntime on ``inputs[0]`` and compare with the
    fake-quant model; returns the figures stored in ``compression.json`` under ``"onnx"``.
    ``int8_activations``: the integer layers round their inputs to int8 in onnxruntime
    (``export_onnx(dynamic_int8_activations=True)``); the file is then held to ``min_sqnr_db``.
    ``dynamic_sequence``: dimension 1 is dynamic too (``export_onnx(dynamic_sequence=True)``),
    and the file is also compared at other lengths (:func:`_check_other_lengths`).

    Raises:
        ParityError: the file's outputs miss the thresholds (``report=None``).
        ArgumentError: ``dynamic_sequence`` and the file does not hold at other lengths
            (see :func:`_check_other_lengths`).
    """
    example = inputs[0] if isinstance(inputs[0], tuple) else (inputs[0],)
    # Linear subclasses too: the `out_proj` (NonDynamicallyQuantizableLinear) of an attention layer.
    linear = {name: layer.weight for name, layer in layers.items()
              if isinstance(model.get_submodule(module_name(name, layer.param)), nn.Linear)
              and layer.weight.spec.bits in INTEGER_BITS}
    with quantization_enabled(model), eval_mode(model), fast_path_disabled(), torch.no_grad():
        onnx_report = export_onnx(model, example, path, linear, dynamic_int8_activations=int8_activations,
                                  dynamic_sequence=dynamic_sequence)
    # onnxruntime's float ops (LayerNorm, softmax) round differently from PyTorch's, which
    # moves a quantized activation on a rounding boundary by one int8 step: with
    # activation quantization the file is held to the int8 path's SQNR threshold instead.
    # Which layers round their activations: int4 MatMulNBits, int8 MatMulInteger (not QDQ:
    # a layer trained with static int8 activations keeps those).
    asked, int8_activations = int8_activations, int8_activations and any(
        op in (MATMUL_NBITS, MATMUL_INTEGER) for op in onnx_report.layers.values())
    if asked and not int8_activations:
        warnings.warn("onnx_activations='int8' changes nothing here: no layer of model.onnx takes int8 activations"
                      " (int4 or int8 Linear layers do; static int8 activations are kept as trained)",
                      UserWarning, stacklevel=3)
    rounded = int8_activations or any(layer.activations is not None for layer in layers.values())
    thresholds = (max_relative_error, min_sqnr_db, rounded, int8_activations)
    error, sqnr = _compare(_reference(model, example), run_onnx(path, example), *thresholds)
    figures = {"layers": onnx_report.layers, "relative_error": error, "bytes": onnx_report.file_bytes,
               "sqnr_db": None if math.isinf(sqnr) else sqnr, "int8_activations": int8_activations}
    if dynamic_sequence:
        figures["dynamic_sequence"] = _check_other_lengths(model, path, example, thresholds)
    return figures


def _reference(model: nn.Module, example: tuple) -> torch.Tensor:
    """The fake-quant model's floating-point outputs on ``example``, as the export computes them."""
    with quantization_enabled(model), eval_mode(model), fast_path_disabled(), torch.no_grad():
        return flatten_outputs(model(*example))


def _compare(reference: torch.Tensor, arrays, max_relative_error: float, min_sqnr_db: float, rounded: bool,
             int8_activations: bool) -> tuple:
    """The relative error and SQNR of onnxruntime's ``arrays`` against the fake-quant model's
    floating-point outputs (``reference``); a :class:`ParityError` past the thresholds.

    Integer outputs (an argmax beside the logits) are left out, as ``reference`` leaves
    them out; a NaN where the model has one (a row of only padding) is equal, and any
    other NaN fails (a NaN error would pass a ``>`` test)."""
    got = torch.cat([torch.from_numpy(a).reshape(-1).float() for a in arrays if a.dtype.kind == "f"])
    if got.numel() == reference.numel() and torch.equal(torch.isnan(reference), torch.isnan(got)):
        kept = ~torch.isnan(reference)
        error, sqnr = relative_error(reference[kept], got[kept]), sqnr_db(reference[kept], got[kept])
    else:
        error, sqnr = math.inf, -math.inf
    if not error <= max_relative_error and not (rounded and sqnr >= min_sqnr_db):
        limit = (f"SQNR {sqnr:.2f} dB < {min_sqnr_db:g}" if rounded else
                 f"> max_relative_error={max_relative_error:g}; raise it to accept the file" if math.isfinite(error) else
                 "NaN where the model has none, or another number of outputs: the file computes something else")
        fix = "; lower min_sqnr_db, or export with onnx_activations='float' (exact)" if int8_activations else ""
        raise ParityError(f"model.onnx in onnxruntime differs from the fake-quant model: relative error {error:.2e}"
                          f" ({limit}){fix}", None, onnx_sqnr_missed=rounded)
    return error, sqnr


def _check_other_lengths(model: nn.Module, path: Path, example: tuple, thresholds: tuple) -> Dict[str, Any]:
    """``model.onnx`` against the model at a shorter and a longer sequence than the
    example's (dimension 1 cut, or extended with its first positions, by a quarter): a
    trace can keep the example's length as a constant (a Python number from a shape, a
    branch on it, PyTorch's ``nn.MultiheadAttention`` reshapes), and the file then
    computes wrongly or fails elsewhere. The longer check is skipped when the model itself
    cannot run there (past its position table).

    Raises:
        ArgumentError: (naming ``onnx_dynamic_sequence``) no input with a sequence at
            dimension 1, the model cannot run at the shorter length, or the file differs
            or fails at either length.
    """
    errors = {}
    for longer in (False, True):
        resized, length = other_length(example, longer)
        which = "longer" if longer else "shorter"
        try:
            reference = _reference(model, resized)
        except Exception as error:
            if longer:
                continue
            raise ArgumentError(
                "onnx_dynamic_sequence", f"onnx_dynamic_sequence=True: the model cannot run on the example"
                f" shortened to length {length} along dimension 1 ({type(error).__name__}: {error}), where its"
                " check runs; it needs the sequence at dimension 1 of every input with two or more dimensions."
                " Export without onnx_dynamic_sequence") from error
        try:
            errors[length] = _compare(reference, run_onnx(path, resized), *thresholds)[0]
        except Exception as error:
            problem = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            raise ArgumentError(
                "onnx_dynamic_sequence", f"onnx_dynamic_sequence=True: model.onnx at sequence length {length}, {which}"
                f" than the example's, fails its check ({problem}): the trace kept the example's length as a"
                " constant somewhere (a Python number taken from a shape, a branch on the length, PyTorch's"
                " nn.MultiheadAttention), so the file holds at that length only. Export without"
                " onnx_dynamic_sequence") from error
    return {"checked_lengths": sorted(errors), "relative_error": max(errors.values())}


def other_length(example: tuple, longer: bool) -> tuple:
    """``example`` with every tensor of two or more dimensions cut along dimension 1 (or
    extended with its first positions) by a quarter of the shortest such length, one at
    least: ``(inputs, new shortest length)``.

    Raises:
        ArgumentError: no such tensor, or one of length 1 (nothing to shorten).
    """
    lengths = [t.shape[1] for t in graph_tensors(example) if t.ndim > 1]
    if not lengths or min(lengths) < 2:
        raise ArgumentError("onnx_dynamic_sequence", "onnx_dynamic_sequence=True needs inputs with a sequence of two or"
                            f" more along dimension 1 (got lengths {lengths} there, one per input with two or more"
                            " dimensions); export without onnx_dynamic_sequence")
    step = max(1, min(lengths) // 4)

    def resize(tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
            return tensor
        if longer:
            return torch.cat([tensor, tensor.narrow(1, 0, step)], dim=1)
        return tensor.narrow(1, 0, tensor.shape[1] - step)

    return map_graph_tensors(example, resize), min(lengths) + (step if longer else -step)


__all__ = ["export_and_check"]
