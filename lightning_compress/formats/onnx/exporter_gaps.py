"""Two gaps of PyTorch's TorchScript ONNX exporter that every transformers decoder hits.

A transformers LLaMA (Mistral, Qwen2, ...) called without an attention mask and without a
cache (``use_cache=False``, how the export runs it) looks for packed sequences in its
position ids (``masking_utils.find_packed_sequence_indices``):
``(torch.diff(position_ids, prepend=...) != 1).cumsum(-1)``. The exporter

- has no conversion for ``aten::diff`` and refuses the model, and
- converts ``cumsum`` of a bool tensor into an ONNX ``CumSum`` of that bool tensor, which
  onnxruntime refuses to load (PyTorch sums bools as int64).

:func:`missing_symbolics` supplies ``aten::diff`` while an export runs (ONNX ``Slice`` and
``Sub``, as :func:`torch.diff` defines it); :func:`cast_bool_cumsum` mends the exported
graph. Both leave every other model's graph as the exporter writes it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# ONNX ops whose output is bool: a CumSum fed by one of these sums bools.
_BOOL_OUTPUT_OPS = frozenset(
    {"Not", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "IsNaN", "IsInf"}
)
_DIFF = "aten::diff"
_DIFF_OPSET = 13  # the lowest opset the export writes (per-channel DequantizeLinear)
_ANY_OPSET = 10_000  # the exporter converts with the latest registration at or below the opset


def _diff_symbolic(g, x, n, dim, prepend, append):
    """``torch.diff(x, n, dim, prepend, append)``: concatenate, then ``n`` times the
    difference of neighbours along ``dim`` (``y[1:] - y[:-1]``)."""
    from torch.onnx import symbolic_helper

    n = symbolic_helper._get_const(n, "i", "n")
    dim = symbolic_helper._get_const(dim, "i", "dim")
    parts = [t for t in (prepend, x, append) if not symbolic_helper._is_none(t)]
    y = g.op("Concat", *parts, axis_i=dim) if len(parts) > 1 else x

    def constant(value: int):
        return g.op("Constant", value_t=torch.tensor([value], dtype=torch.int64))

    axis, start, stop_all, after_first, before_last = constant(dim), constant(0), constant(2**62), constant(1), constant(-1)
    for _ in range(n):
        y = g.op("Sub", g.op("Slice", y, after_first, stop_all, axis), g.op("Slice", y, start, before_last, axis))
    return y


def _registry():
    """The TorchScript exporter's table of conversions (private to PyTorch), or None."""
    try:
        from torch.onnx._internal.torchscript_exporter.registration import registry
    except ImportError:  # another PyTorch layout
        return None
    return registry


@contextlib.contextmanager
def missing_symbolics(opset: int | None) -> Iterator[None]:
    """Register the ``aten::diff`` conversion for the duration of one export, unless one
    is registered already (the user's); removed afterwards, so the caller's exporter is
    left as found."""
    registry = _registry()
    if registry is not None and registry.is_registered_op(_DIFF, _ANY_OPSET if opset is None else opset):
        yield
        return
    torch.onnx.register_custom_op_symbolic(_DIFF, _diff_symbolic, _DIFF_OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_DIFF, _DIFF_OPSET)
        # Unregistering leaves an empty entry, on which a later export of a model using
        # diff fails with "min() arg is an empty sequence" instead of naming the op.
        table = getattr(registry, "_registry", None)
        if isinstance(table, dict) and not registry.is_registered_op(_DIFF, _ANY_OPSET):
            table.pop(_DIFF, None)


def cast_bool_cumsum(graph_model) -> int:
    """Cast the input of every ``CumSum`` that sums a bool tensor to int64, as PyTorch
    does; ``graph_model`` (an ``onnx.ModelProto``) is changed in place.

    A bool input is recognized by the op that computes it (:data:`_BOOL_OUTPUT_OPS`), or
    a bool graph input, not by shape inference, which cannot take a graph over 2 GiB.

    Returns:
        How many ``CumSum`` nodes were mended.
    """
    from onnx import TensorProto, helper

    graph = graph_model.graph
    bool_values = {out for node in graph.node if node.op_type in _BOOL_OUTPUT_OPS for out in node.output}
    bool_values |= {v.name for v in graph.input if v.type.tensor_type.elem_type == TensorProto.BOOL}
    nodes, sums = [], set()
    for node in graph.node:
        if node.op_type == "CumSum" and node.input[0] in bool_values:
            as_int64 = f"{node.input[0]}/as_int64"
            nodes.append(helper.make_node("Cast", [node.input[0]], [as_int64], to=TensorProto.INT64,
                                          name=f"{node.name}/cast_bool"))
            node.input[0] = as_int64
            sums.add(node.output[0])
        nodes.append(node)
    if sums:
        del graph.node[:]
        graph.node.extend(nodes)
        # The exporter typed the sum as bool too where it declares it (a graph output).
        for value in (*graph.output, *graph.value_info):
            if value.name in sums:
                value.type.tensor_type.elem_type = TensorProto.INT64
    return len(sums)
