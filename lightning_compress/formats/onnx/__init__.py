"""ONNX export with integer weights: int4 ``MatMulNBits``, int8 QDQ or ``MatMulInteger``.

:func:`export_onnx` exports a model with PyTorch's ONNX exporter and rewrites the graph so
that every Linear named in ``quantized`` stores the exact integer codes the fake
quantization used; :func:`run_onnx` runs the file in onnxruntime. The pieces:

- :mod:`~lightning_compress.formats.onnx.layouts`: which grid maps to which op
  (:func:`onnx_op`) and how each op lays out its integer tensors;
- :mod:`~lightning_compress.formats.onnx.graph`: checking the layers against the model and
  rewriting the exported float graph;
- :mod:`~lightning_compress.formats.onnx.io`: exporting, writing (atomically) and running
  the ``.onnx`` files.

The ``onnx`` and ``onnxruntime`` packages (the ``onnx`` extra) are imported only when a
function needs them.
"""

from lightning_compress.formats.onnx.io import OnnxExportReport, export_onnx, run_onnx
from lightning_compress.formats.onnx.layouts import (
    MATMUL_INTEGER,
    MATMUL_NBITS,
    QDQ,
    SUPPORTED,
    onnx_op,
    pack_int4,
    pack_int4_zero_points,
)

__all__ = [
    "MATMUL_INTEGER",
    "MATMUL_NBITS",
    "QDQ",
    "SUPPORTED",
    "OnnxExportReport",
    "export_onnx",
    "onnx_op",
    "pack_int4",
    "pack_int4_zero_points",
    "run_onnx",
]
