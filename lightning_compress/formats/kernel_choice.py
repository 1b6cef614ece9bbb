"""Which kernel a packed layer runs, from its grid and the export's measurement alone
(no codes touched): what :mod:`~lightning_compress.formats.runtime` builds and what the
parity check plans and measures."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from lightning_compress.formats.packed import PackedLayer


def int8_gemm_candidate(layer: PackedLayer) -> bool:
    """Whether ``backend="auto"`` may run ``layer`` on the int8 GEMM when the export's
    measurement lets it: int8 per-channel/per-tensor weights, weight-only or trained with
    dynamic int8 activations. Not static-activation layers: training clipped their inputs
    to the calibrated range, which the dynamic kernel does not (measured: 25 to 34 dB SQNR
    against a static-range model, under the default 35)."""
    return int8_gemm_grid(layer) and layer.activations in (None, "int8_dynamic")


def int8_gemm_grid(layer: PackedLayer) -> bool:
    """int8 per-channel or per-tensor weights: the grids the fbgemm kernel takes."""
    spec = layer.weight.spec
    return spec.bits == 8 and spec.granularity != "group"


def calls_its_forward(layer: PackedLayer, original: nn.Module) -> bool:
    """Whether the packed replacement of the Linear ``original`` is called as a module, so
    that a kernel of its own can run: not a weight-only ``out_proj`` of an attention
    layer, whose weight PyTorch's attention reads directly (PyTorch's own marker class)."""
    return isinstance(original, nn.Linear) and not (
        isinstance(original, nn.modules.linear.NonDynamicallyQuantizableLinear) and layer.activations is None)


def planned_kernel(weights: Sequence[PackedLayer], original: nn.Module, backend: str, chosen: Optional[str] = None) -> str:
    """The kernel :func:`~lightning_compress.formats.runtime.build_packed_unit` tries for ``original``, from its ``weights``' grids alone."""
    single = len(weights) == 1 and calls_its_forward(weights[0], original)
    return "fbgemm" if single and int8_gemm_grid(weights[0]) and runs_int8_gemm(weights[0], backend, chosen) else "dequantize"


def runs_int8_gemm(layer: PackedLayer, backend: str, chosen: Optional[str]) -> bool:
    """Whether ``backend`` (with the export's ``chosen`` kernel, if it measured one) runs
    ``layer``, whose grid the int8 GEMM takes, on it."""
    if backend != "auto":
        return backend == "fbgemm"
    if chosen is not None:  # the export measured this layer on both kernels
        return chosen == "fbgemm"
    # Unmeasured: only where training quantized the activations per token, as the kernel does.
    return layer.activations == "int8_dynamic"


__all__ = ["calls_its_forward", "int8_gemm_candidate", "int8_gemm_grid", "planned_kernel", "runs_int8_gemm"]
