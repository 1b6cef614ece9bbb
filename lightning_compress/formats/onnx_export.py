"""ONNX export with integer weights: int4 ``MatMulNBits``, int8 QDQ or ``MatMulInteger``.

:func:`export_onnx` exports a model with PyTorch's ONNX exporter, then rewrites the graph
with the ``onnx`` package so that every Linear named in ``quantized`` stores its weight as
the exact integer codes the fake quantization used (:func:`~lightning_compress.quant.weights.quantized_weights`),
not as floats. Layouts, per bit width:

- **int4** (group size a power of two >= 16, per channel, or per tensor): onnxruntime's
  contrib op ``com.microsoft.MatMulNBits`` (``Y = A @ dequant(B)^T``). Its codes are
  *unsigned* nibbles with a default zero point of 8, so our signed code ``q`` in
  ``[-8, 7]`` is stored as ``q + 8`` and an asymmetric zero point ``z`` as ``z + 8``:
  ``(q + 8 - (z + 8)) * s == (q - z) * s``, the same dequantized weight bit for bit.
  ``B`` is uint8 ``[N, n_blocks, block_size / 2]``, two codes a byte, the first (lower
  ``k``) in the low nibble; ``scales`` is float ``[N * n_blocks]``; zero points (only
  for asymmetric grids, since 8 is the default) are uint8 ``[N * ceil(n_blocks / 2)]``,
  packed the same way row by row. ORT wants ``block_size`` a power of two >= 16, so a
  group size is used as is, and a per-channel (or per-tensor, broadcast to every row)
  grid becomes one block per row of ``K`` rounded up to a power of two, the tail padded
  with code 0 (never read: ``A`` has only ``K`` columns).
- **int8** (per channel or per tensor), the default: QDQ, ``DequantizeLinear`` of an int8
  initializer feeding a plain ``MatMul``. The initializer holds the *transposed* codes
  ``[K, N]`` (MatMul's ``B`` layout, which also serves 3-D inputs, where ``Gemm`` would
  not), so the per-channel axis is 1. The dequantization is ``(q - z) * s``, exact: the
  output differs from PyTorch by float accumulation order only. Caveat: onnxruntime's
  default session (1.2x) fuses a symmetric per-channel DequantizeLinear + MatMul into a
  ``MatMulNBits`` with ``accuracy_level=4``, which rounds the activations to int8 as well;
  the session config ``session.qdq_matmulnbits_accuracy_level=0`` keeps it weight-only,
  and :func:`run_onnx` sets it.
- **int8 with** ``dynamic_int8_activations=True``: ``DynamicQuantizeLinear`` (uint8
  activations, one scale per tensor, computed at run time) + ``MatMulInteger`` + a
  rescale by ``x_scale * w_scale``. Weights are stored as uint8 ``q + 128`` with a
  ``b_zero_point`` of 128 rather than int8: on x86 CPUs without VNNI, onnxruntime's
  uint8 x int8 kernel adds pairs of products in saturating int16 (``vpmaddubsw``), which
  overflows for full-range codes; the uint8 x uint8 kernel does not. Symmetric grids only,
  because the rescale after the integer product needs a zero weight zero point.

Anything else (int2/3/5/6/7, int8 groups, int4 groups that are not a power of two >= 16,
Conv layers) is refused with a ``ValueError`` naming the layer, before anything is
exported.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``):
it needs nothing beyond ``torch`` and ``onnx``, keeps ``fc1.weight``-like initializer names
for ``Gemm`` nodes and folds the weight transposes of 3-D ``MatMul`` into initializers.
The rewrite finds each layer's ``Gemm``/``MatMul`` by initializer name and otherwise by
exact value equality with ``q.dequantize()`` (transposed as the node reads it), so it does
not depend on the exporter's naming. The dynamo-based exporter (which needs the
``onnxscript`` package) is used only if the TorchScript one is unavailable.

Dimension 0 of every input and output is exported as a dynamic ``batch`` dimension.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress.core.targeting import close_names_hint
from lightning_compress.core.transforms import detach_all, is_transformed
from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.nf4 import nf4_deepcopy_memo
from lightning_compress.quant.spec import QuantSpec

MATMUL_NBITS = "MatMulNBits"
QDQ = "QDQ"
MATMUL_INTEGER = "MatMulInteger"

SUPPORTED = (
    "int4 per group (group_size a power of two >= 16), per channel or per tensor, symmetric or"
    " asymmetric (MatMulNBits); int8 per channel or per tensor (QDQ, or MatMulInteger with"
    " dynamic_int8_activations=True, symmetric only)"
)

_MS_DOMAIN = "com.microsoft"
# A protobuf message cannot exceed 2 GiB; bigger graphs keep their tensors in a side file.
_PROTOBUF_LIMIT = 2**31 - 2**24


@dataclass(frozen=True)
class OnnxExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        layers: per quantized layer, the op that computes it: ``"MatMulNBits"``,
            ``"QDQ"`` (DequantizeLinear + MatMul) or ``"MatMulInteger"``.
        file_bytes: size on disk (the graph plus its external data file, if any).
        float_file_bytes: size of the plain float export of the same model, for comparison.
        opset: the default-domain opset of the graph.
        external_data: the side file holding the tensors when the graph is over 2 GiB.
        nodes: per quantized layer, how many graph nodes were rewritten (a layer called
            twice in ``forward`` has two, sharing one set of integer initializers).
    """

    path: Path
    layers: dict[str, str]
    file_bytes: int
    float_file_bytes: int
    opset: int
    external_data: Path | None = None
    nodes: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``file_bytes / float_file_bytes``."""
        return self.file_bytes / self.float_file_bytes


@dataclass
class _Plan:
    name: str
    op: str
    q: QuantizedWeight
    dequantized: np.ndarray  # [N, K] float32, what the float export holds


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path,
    quantized: Mapping[str, QuantizedWeight],
    *,
    opset: int | None = None,
    dynamic_int8_activations: bool = False,
) -> OnnxExportReport:
    """Export ``model`` to ONNX with the Linear layers in ``quantized`` stored as integers.

    Args:
        model: computes with the dequantized weights already: a model after
            :func:`~lightning_compress.quant.weights.round_to_nearest` or QAT, or a float
            model whose quantized Linear weights equal ``quantized[name].dequantize()``.
            It is not changed (a copy is exported, its weight transforms folded into plain
            weights).
        example_inputs: positional inputs for one forward (a single tensor is accepted).
            Dimension 0 of each input and output is exported as a dynamic batch size.
        path: the ``.onnx`` file to write; written atomically (temporary file beside it,
            then a rename).
        quantized: ``{Linear layer name: QuantizedWeight}``, e.g. from
            :func:`~lightning_compress.quant.weights.quantized_weights` (drop Conv layers:
            they are not supported here). Layers not named are exported in float.
        opset: default-domain opset; ``None`` takes the exporter's default. At least 13
            (per-channel ``DequantizeLinear``).
        dynamic_int8_activations: compute int8 layers with ``DynamicQuantizeLinear`` +
            ``MatMulInteger`` (faster, approximate: activations are rounded to uint8)
            instead of weight-only QDQ (exact). int4 layers use ``MatMulNBits`` either way.

    Returns:
        An :class:`OnnxExportReport` (op per layer, file sizes).

    Raises:
        ValueError: a layer in ``quantized`` is missing from the model or from the exported
            graph, is not an ``nn.Linear``, has a grid this export does not support, or its
            weight in ``model`` is not ``quantized[name].dequantize()``; or ``opset < 13``.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if opset is not None and opset < 13:
        raise ValueError(f"`opset` must be >= 13 (per-channel DequantizeLinear), got {opset}")
    path = Path(path)
    plans = _plan(model, quantized, dynamic_int8_activations)

    with tempfile.TemporaryDirectory(prefix="lc-onnx-") as workdir:
        float_path = Path(workdir) / "float.onnx"
        _export_float(model, example_inputs, float_path, plans, opset)
        float_bytes = _size_with_data(float_path)
        import onnx

        graph_model = onnx.load(str(float_path))
    nodes = _rewrite(graph_model, plans)
    external = _save_atomic(graph_model, path)
    opset_used = next(o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx"))
    size = path.stat().st_size + (external.stat().st_size if external else 0)
    return OnnxExportReport(
        path=path,
        layers={name: plan.op for name, plan in plans.items()},
        file_bytes=size,
        float_file_bytes=float_bytes,
        opset=opset_used,
        external_data=external,
        nodes=nodes,
    )


def run_onnx(path, inputs: tuple, *, session_config: Mapping[str, str] | None = None) -> list[np.ndarray]:
    """Run the ONNX file at ``path`` on CPU with onnxruntime; returns every output.

    ``inputs`` are positional (torch tensors or numpy arrays), matched to the graph inputs
    in order; non-tensor entries (baked into the graph by the exporter) are skipped.

    The session keeps int8 QDQ layers weight-only: onnxruntime otherwise fuses
    ``DequantizeLinear`` + ``MatMul`` into a ``MatMulNBits`` with ``accuracy_level=4``,
    which rounds the activations to int8 too (about 47 dB SQNR instead of float rounding
    on a small MLP). ``session_config`` entries (``SessionOptions.add_session_config_entry``)
    override that, e.g. ``{"session.qdq_matmulnbits_accuracy_level": "4"}`` for speed.
    """
    import onnxruntime as ort

    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    arrays = [
        x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        for x in inputs
        if isinstance(x, (torch.Tensor, np.ndarray))
    ]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    config = {"session.qdq_matmulnbits_accuracy_level": "0", **(session_config or {})}
    for key, value in config.items():
        options.add_session_config_entry(key, str(value))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != len(arrays):
        raise ValueError(
            f"the graph takes {len(graph_inputs)} input(s) ({[i.name for i in graph_inputs]}),"
            f" got {len(arrays)} tensor(s)"
        )
    return session.run(None, {spec.name: array for spec, array in zip(graph_inputs, arrays)})


def pack_int4(codes: np.ndarray, block_size: int) -> np.ndarray:
    """MatMulNBits' ``B``: signed int4 codes ``[N, K]`` -> uint8 ``[N, n_blocks, block_size / 2]``.

    Each code is stored as ``q + 8`` (ORT's nibbles are unsigned, zero point 8); two per
    byte, the lower ``k`` in the low nibble; ``K`` is padded to ``n_blocks * block_size``
    with code 0.
    """
    codes = np.asarray(codes)
    rows, k = codes.shape
    n_blocks = -(-k // block_size)
    unsigned = np.full((rows, n_blocks * block_size), 8, dtype=np.uint8)
    unsigned[:, :k] = (codes.astype(np.int16) + 8).astype(np.uint8)
    packed = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    return packed.reshape(rows, n_blocks, block_size // 2)


def pack_int4_zero_points(zero_point: np.ndarray) -> np.ndarray:
    """MatMulNBits' ``zero_points``: signed int4 ``[N, n_blocks]`` -> uint8
    ``[N * ceil(n_blocks / 2)]``, ``z + 8`` packed two a byte (low nibble first), each row
    padded to whole bytes."""
    zero_point = np.asarray(zero_point)
    rows, n_blocks = zero_point.shape
    unsigned = np.zeros((rows, n_blocks + n_blocks % 2), dtype=np.uint8)
    unsigned[:, :n_blocks] = (zero_point.astype(np.int16) + 8).astype(np.uint8)
    return (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).reshape(-1)


# --------------------------------------------------------------------------- planning


def _plan(model: nn.Module, quantized: Mapping[str, QuantizedWeight], dynamic: bool) -> dict[str, _Plan]:
    # Everything is checked before exporting, so a bad mapping fails fast and names the layer.
    modules = dict(model.named_modules())
    missing = [name for name in quantized if name not in modules]
    if missing:
        raise ValueError(
            f"`quantized` names layer(s) {missing} that the model does not have."
            + close_names_hint(missing[0], [n for n in modules if n])
        )
    plans = {}
    for name, q in quantized.items():
        layer = modules[name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"layer {name!r} is a {type(layer).__name__}; only nn.Linear layers can be"
                " exported with integer weights. Leave it out of `quantized` (it is then"
                " exported in float)."
            )
        op = onnx_op(name, q.spec, dynamic)
        expected = (layer.out_features, layer.in_features)
        if tuple(q.codes.shape) != expected:
            raise ValueError(
                f"layer {name!r}: quantized codes are {tuple(q.codes.shape)}, the weight is {expected}"
            )
        dequantized = q.dequantize().detach().float().reshape(expected).cpu()
        with torch.no_grad():
            weight = layer.weight.detach().float().cpu()
        # The graph computes with `dequantized`; a different weight in the model means the
        # mapping came from another model or another step, and the export would silently
        # change the outputs.
        tolerance = 1e-6 * max(float(dequantized.abs().max()), 1e-30)
        if not torch.allclose(weight, dequantized, rtol=0.0, atol=tolerance):
            error = float((weight - dequantized).abs().max())
            raise ValueError(
                f"layer {name!r}: the model's weight differs from quantized[{name!r}].dequantize()"
                f" (max abs difference {error:.3g}); pass the QuantizedWeight read from this"
                " model (quantized_weights(model)) after its last update"
            )
        plans[name] = _Plan(name, op, q, dequantized.numpy())
    return plans


def onnx_op(name: str, spec: QuantSpec, dynamic: bool = False) -> str:
    """The op that computes layer ``name`` quantized with ``spec`` in the ONNX graph.

    Raises:
        ValueError: naming the layer, for a grid this export cannot write.
    """
    if spec.bits == 4:
        if spec.granularity in ("channel", "tensor"):
            return MATMUL_NBITS
        size = spec.group_size
        if size >= 16 and size & (size - 1) == 0:
            return MATMUL_NBITS
    elif spec.bits == 8 and spec.granularity in ("channel", "tensor"):
        if not dynamic:
            return QDQ
        if spec.symmetric:
            return MATMUL_INTEGER
        raise ValueError(
            f"layer {name!r} is {spec.describe()}: dynamic_int8_activations=True (MatMulInteger)"
            " supports symmetric int8 weights only; export it with dynamic_int8_activations=False"
            " (QDQ) or quantize it symmetrically"
        )
    raise ValueError(f"layer {name!r} is {spec.describe()}, which this ONNX export does not support. Supported: {SUPPORTED}")


# --------------------------------------------------------------------------- export


def _export_copy(model: nn.Module, plans: Mapping[str, _Plan]) -> nn.Module:
    # A copy, so the caller's model keeps its transforms; the memo keeps an attached
    # Trainer (and all it holds) out of the copy.
    trainer = model.__dict__.get("_trainer")
    memo = {id(trainer): None} if trainer is not None else {}
    memo.update(nf4_deepcopy_memo(model))  # QLoRA bases, copied exactly
    clone = copy.deepcopy(model, memo)
    # Fold every weight transform (fake quant, masks, adapters) into a plain weight, so the
    # exporter sees a constant initializer instead of tracing round/clamp ops; quantized
    # layers get exactly q.dequantize(), which the graph rewrite then finds by value.
    effective = {}
    with torch.no_grad():
        for name, module in clone.named_modules():
            if name in plans:
                weight = module._parameters["weight"]
                value = torch.from_numpy(plans[name].dequantized).to(weight.device, weight.dtype)
                effective[name] = value
            elif is_transformed(module):
                effective[name] = module.weight.detach().clone()
    detach_all(clone)
    modules = dict(clone.named_modules())
    for name, value in effective.items():
        modules[name]._parameters["weight"] = nn.Parameter(value, requires_grad=False)
    return clone.eval()


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flatten(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _flatten(item)]
    return []


def _export_float(
    model: nn.Module, example_inputs: tuple, path: Path, plans: Mapping[str, _Plan], opset: int | None
) -> None:
    clone = _export_copy(model, plans)
    with torch.no_grad():
        outputs = _flatten(clone(*example_inputs))
    tensor_inputs = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    input_names = [f"input_{i}" for i in range(len(tensor_inputs))]
    output_names = [f"output_{i}" for i in range(len(outputs))]
    dynamic_axes = {
        name: {0: "batch"}
        for name, tensor in zip(input_names + output_names, tensor_inputs + outputs)
        if tensor.dim() > 0
    }
    try:
        _export_torchscript(clone, example_inputs, path, input_names, output_names, dynamic_axes, opset)
    except (TypeError, NotImplementedError, AttributeError) as legacy_error:
        # A PyTorch without the TorchScript exporter (deprecated since 2.9): the dynamo one
        # needs onnxscript. Forward errors cannot land here: the forward above ran already.
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise ImportError(
                "this PyTorch's TorchScript ONNX exporter failed"
                f" ({type(legacy_error).__name__}: {legacy_error}) and the dynamo exporter needs"
                " the `onnxscript` package: pip install onnxscript"
            ) from legacy_error
        _export_dynamo(clone, example_inputs, path, input_names, output_names, opset)


def _export_torchscript(model, example_inputs, path, input_names, output_names, dynamic_axes, opset) -> None:
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but still the one without extra
        # dependencies; its warnings say nothing the user can act on here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example_inputs,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def _export_dynamo(model, example_inputs, path, input_names, output_names, opset) -> None:
    batch = torch.export.Dim("batch")
    tensor_inputs = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    dynamic_shapes = tuple({0: batch} if x.dim() > 0 else None for x in tensor_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example_inputs,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))


def _size_with_data(path: Path) -> int:
    # The exporter may put big tensors in side files next to the graph.
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


# --------------------------------------------------------------------------- graph rewrite


@dataclass
class _Candidate:
    index: int  # node position in graph.node
    weight_name: str  # the initializer holding the weight
    matrix: np.ndarray  # [N, K] as the node computes with it
    bias: str | None  # Gemm's C input, to keep as an Add
    via_transpose: int | None  # index of a Transpose node feeding MatMul's B


def _value_key(matrix: np.ndarray) -> tuple[tuple, str]:
    # + 0.0 turns -0.0 into 0.0, so equal values hash equal.
    data = np.ascontiguousarray(matrix.astype(np.float32) + np.float32(0.0))
    return matrix.shape, hashlib.sha1(data.tobytes()).hexdigest()


def _candidates(graph, initializers: Mapping[str, Any]) -> list[_Candidate]:
    from onnx import helper, numpy_helper

    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray | None:
        if name not in initializers:
            return None
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(initializers[name])
        value = arrays[name]
        return value if value.ndim == 2 and value.dtype.kind == "f" else None

    found = []
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = node.input[1]
        if node.op_type == "Gemm":
            # A Linear exports as Gemm(x, W, b, transB=1); other forms are not a Linear.
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            value = array(b)
            if value is None:
                continue
            matrix = value if attrs.get("transB", 0) else value.T
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            found.append(_Candidate(index, b, matrix, bias, None))
        elif node.op_type == "MatMul":
            value = array(b)
            if value is not None:  # a folded transpose: B is W^T [K, N]
                found.append(_Candidate(index, b, value.T, None, None))
                continue
            producer = producers.get(b)
            if producer is None or graph.node[producer].op_type != "Transpose":
                continue
            transpose = graph.node[producer]
            perm = [helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm"]
            value = array(transpose.input[0])
            if value is not None and (not perm or list(perm[0]) == [1, 0]):
                found.append(_Candidate(index, transpose.input[0], value, None, producer))
    return found


def _match(plans: Mapping[str, _Plan], candidates: Sequence[_Candidate]) -> dict[int, _Plan]:
    """Node index -> the layer that replaces it. Raises if a layer has no node."""
    claimed: dict[int, _Plan] = {}
    found = set()
    # 1. By name: the exporter keeps `fc1.weight` for parameters it uses as they are.
    for plan in plans.values():
        for candidate in candidates:
            if candidate.weight_name == f"{plan.name}.weight" and np.array_equal(
                candidate.matrix, plan.dequantized
            ):
                claimed.setdefault(candidate.index, plan)
                found.add(plan.name)
    # 2. By value: folded transposes get generated names ("onnx::MatMul_12"). The weights
    # hold exactly q.dequantize(), so equality is exact. Layers with identical weights may
    # share one initializer (the exporter deduplicates them): any matching node counts.
    by_value: dict[tuple, list[_Candidate]] = {}
    for candidate in candidates:
        by_value.setdefault(_value_key(candidate.matrix), []).append(candidate)
    for plan in plans.values():
        for candidate in by_value.get(_value_key(plan.dequantized), []):
            if np.array_equal(candidate.matrix, plan.dequantized):
                found.add(plan.name)
                claimed.setdefault(candidate.index, plan)
    missing = [name for name in plans if name not in found]
    if missing:
        raise ValueError(
            f"no MatMul/Gemm in the exported graph uses the weight of layer(s) {missing}; was the"
            " layer called in forward, and as a plain Linear (x @ W.T + b)?"
        )
    return claimed


def _rewrite(graph_model, plans: Mapping[str, _Plan]) -> dict[str, int]:
    """Replace the float weights of ``plans``' layers in ``graph_model`` (in place)."""
    from onnx import helper

    graph = graph_model.graph
    if not plans:
        return {}
    initializers = {init.name: init for init in graph.initializer}
    candidates = _candidates(graph, initializers)
    claimed = _match(plans, candidates)
    by_index = {c.index: c for c in candidates}

    new_initializers: dict[str, Any] = {}
    replacement: dict[int, list] = {}
    counts: dict[str, int] = {}
    for index, plan in claimed.items():
        candidate = by_index[index]
        node = graph.node[index]
        elem_type = initializers[candidate.weight_name].data_type
        output = node.output[0]
        product = f"{output}/matmul" if candidate.bias else output
        prefix = f"/{plan.name}/{plan.op}_{counts.get(plan.name, 0)}"
        builder = {MATMUL_NBITS: _nbits_nodes, QDQ: _qdq_nodes, MATMUL_INTEGER: _dynamic_nodes}[plan.op]
        nodes = builder(plan, node.input[0], product, prefix, elem_type, new_initializers)
        if candidate.bias:
            nodes.append(helper.make_node("Add", [product, candidate.bias], [output], name=f"{prefix}/bias"))
        replacement[index] = nodes
        counts[plan.name] = counts.get(plan.name, 0) + 1

    old_nodes = list(graph.node)
    rebuilt = []
    for index, node in enumerate(old_nodes):
        rebuilt.extend(replacement.get(index, [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_initializers.values())

    # Drop the float weights (and the transposes that fed them to MatMul) that nothing
    # reads any more; a tied weight that another node still uses stays.
    bypassed = {old_nodes[by_index[i].via_transpose].output[0] for i in claimed if by_index[i].via_transpose is not None}
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept_nodes = [node for node in graph.node if not (set(node.output) & bypassed and not set(node.output) & used)]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dropped = {by_index[i].weight_name for i in claimed} - used
    for container in (graph.initializer, graph.input, graph.value_info):
        kept = [v for v in container if v.name not in dropped]
        del container[:]
        container.extend(kept)

    uses_contrib = any(plan.op == MATMUL_NBITS for plan in claimed.values())
    if uses_contrib and not any(o.domain == _MS_DOMAIN for o in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    return counts


def _nbits_nodes(plan: _Plan, a: str, y: str, prefix: str, elem_type: int, inits: dict) -> list:
    from onnx import helper

    q = plan.q
    spec = q.spec
    n, k = q.codes.shape
    codes = q.codes.cpu().numpy()
    scale = q.scale.detach().float().cpu().numpy()
    zero_point = q.zero_point.cpu().numpy().astype(np.int32)
    if spec.granularity == "group":
        block_size = spec.group_size
    else:
        # One block per row, K rounded up to a power of two (ORT's block size rule).
        block_size = max(16, 1 << (k - 1).bit_length())
        scale = np.broadcast_to(scale.reshape(-1, 1), (n, 1))
        zero_point = np.broadcast_to(zero_point.reshape(-1, 1), (n, 1))
    names = [f"{plan.name}.weight_q4", f"{plan.name}.weight_scales"]
    inputs = [a, *names]
    if names[0] not in inits:
        inits[names[0]] = _tensor(names[0], pack_int4(codes, block_size))
        inits[names[1]] = _tensor(names[1], scale.reshape(-1), elem_type)
    if not spec.symmetric:  # symmetric: ORT's default zero point 8 is our 0
        zp_name = f"{plan.name}.weight_zero_points"
        if zp_name not in inits:
            inits[zp_name] = _tensor(zp_name, pack_int4_zero_points(zero_point))
        inputs.append(zp_name)
    return [
        helper.make_node(
            MATMUL_NBITS,
            inputs,
            [y],
            name=prefix,
            domain=_MS_DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=block_size,
        )
    ]


def _qdq_nodes(plan: _Plan, a: str, y: str, prefix: str, elem_type: int, inits: dict) -> list:
    from onnx import helper

    q = plan.q
    weight, scale, zp = f"{plan.name}.weight_int8", f"{plan.name}.weight_scale", f"{plan.name}.weight_zero_point"
    per_channel = q.spec.granularity == "channel"
    if weight not in inits:
        # MatMul's B is [K, N]: transposed codes, one scale per column (axis 1).
        inits[weight] = _tensor(weight, q.codes.cpu().numpy().T.astype(np.int8))
        scales = q.scale.detach().float().cpu().numpy().reshape(-1)
        points = q.zero_point.cpu().numpy().reshape(-1).astype(np.int8)
        inits[scale] = _tensor(scale, scales if per_channel else scales.reshape(()), elem_type)
        inits[zp] = _tensor(zp, points if per_channel else points.reshape(()))
    dequantized = f"{prefix}/weight"
    attrs = {"axis": 1} if per_channel else {}
    return [
        helper.make_node("DequantizeLinear", [weight, scale, zp], [dequantized], name=f"{prefix}/dequantize", **attrs),
        helper.make_node("MatMul", [a, dequantized], [y], name=f"{prefix}/matmul"),
    ]


def _dynamic_nodes(plan: _Plan, a: str, y: str, prefix: str, elem_type: int, inits: dict) -> list:
    from onnx import TensorProto, helper

    if elem_type != TensorProto.FLOAT:
        raise ValueError(
            f"layer {plan.name!r}: dynamic_int8_activations needs a float32 model"
            " (DynamicQuantizeLinear takes float32)"
        )
    q = plan.q
    weight, wzp, wscale = f"{plan.name}.weight_uint8", f"{plan.name}.weight_zero_point", f"{plan.name}.weight_scale"
    if weight not in inits:
        # uint8 codes + 128 with zero point 128: see the module docstring (int16 saturation).
        codes = q.codes.cpu().numpy().T.astype(np.int16) + 128
        inits[weight] = _tensor(weight, codes.astype(np.uint8))
        inits[wzp] = _tensor(wzp, np.array(128, dtype=np.uint8))
        scales = q.scale.detach().float().cpu().numpy().reshape(-1)
        inits[wscale] = _tensor(wscale, scales if q.spec.granularity == "channel" else scales.reshape(()))
    xq, xs, xz = f"{prefix}/x_q", f"{prefix}/x_scale", f"{prefix}/x_zero_point"
    acc, acc_f, rescale = f"{prefix}/int32", f"{prefix}/float", f"{prefix}/scale"
    return [
        helper.make_node("DynamicQuantizeLinear", [a], [xq, xs, xz], name=f"{prefix}/quantize"),
        helper.make_node("MatMulInteger", [xq, weight, xz, wzp], [acc], name=f"{prefix}/matmul"),
        helper.make_node("Cast", [acc], [acc_f], name=f"{prefix}/cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [xs, wscale], [rescale], name=f"{prefix}/scales"),
        helper.make_node("Mul", [acc_f, rescale], [y], name=f"{prefix}/rescale"),
    ]


def _tensor(name: str, array: np.ndarray, elem_type: int | None = None):
    from onnx import helper, numpy_helper

    array = np.ascontiguousarray(array)
    if elem_type is not None:
        array = array.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    return numpy_helper.from_array(array, name)


# --------------------------------------------------------------------------- writing


def _save_atomic(graph_model, path: Path) -> Path | None:
    """Write ``graph_model`` to ``path`` via a temporary file and a rename; returns the
    external data file when the graph is too big for one protobuf message."""
    import onnx

    from lightning_compress.formats.atomic import atomic_write_bytes

    if graph_model.ByteSize() < _PROTOBUF_LIMIT:
        atomic_write_bytes(path, graph_model.SerializeToString())
        return None
    # Over 2 GiB: tensors go to `<name>.data`. Both files are written in a temporary
    # folder beside the target, then renamed, data first, so the graph never points at a
    # half-written data file.
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(
            graph_model,
            str(workdir / path.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        os.replace(workdir / data.name, data)
        os.replace(workdir / path.name, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return data


__all__ = ["OnnxExportReport", "export_onnx", "pack_int4", "pack_int4_zero_points", "run_onnx"]
