"""Rewriting the float graph PyTorch exported so that quantized Linear layers compute with
integer weights.

:func:`plan_layers` checks the ``{layer: QuantizedWeight}`` mapping against the model
before anything is exported. :func:`rewrite_graph` then finds each layer's ``Gemm`` /
``MatMul`` by initializer name (the TorchScript exporter keeps ``fc1.weight``-like names
for ``Gemm`` nodes) and otherwise by exact value equality with ``q.dequantize()``
(transposed as the node reads it; folded transposes of 3-D ``MatMul`` get generated
names), so it does not depend on the exporter's naming. Each match is replaced by the
nodes of its layout (:mod:`~lightning_compress.formats.onnx.layouts`), and the float
weights nothing reads any more are dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Iterable, Tuple

import numpy as np
import torch
from torch import nn

from lightning_compress.core.targeting import close_names_hint
from lightning_compress.core.transforms import Stage, get_input_transform, raw_weight
from lightning_compress.formats.onnx.layouts import INTEGER_BITS, MATMUL_INTEGER, MATMUL_NBITS, MS_DOMAIN, LayerPlan, layer_nodes, onnx_op
from lightning_compress.quant.activations import StaticRangeObserver
from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.spec import QuantSpec


def plan_layers(model: nn.Module, quantized: Mapping[str, QuantizedWeight], dynamic: bool) -> dict[str, LayerPlan]:
    """Check ``quantized`` against ``model`` and choose each layer's op.

    Everything is checked before exporting, so a bad mapping fails fast and names the layer.

    Raises:
        ValueError: a layer is missing from the model, is not an ``nn.Linear``, has a grid
            the export does not support, or its weight is not ``quantized[name].dequantize()``.
    """
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
        # A layer trained with static int8 activations keeps them (traced): weight-only there.
        op = onnx_op(name, q.spec, dynamic and not _static_activations(layer))
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
        plans[name] = LayerPlan(name, op, q, dequantized.numpy(), int8_activations=dynamic)
    return plans


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
            if producer is not None and graph.node[producer].op_type == "Identity":
                # A Linear called again on 3-D inputs: the exporter feeds it W^T through an Identity.
                value = array(graph.node[producer].input[0])
                if value is not None:
                    found.append(_Candidate(index, graph.node[producer].input[0], value.T, None, producer))
                continue
            if producer is None or graph.node[producer].op_type != "Transpose":
                continue
            transpose = graph.node[producer]
            perm = [helper.get_attribute_value(a) for a in transpose.attribute if a.name == "perm"]
            value = array(transpose.input[0])
            if value is not None and (not perm or list(perm[0]) == [1, 0]):
                found.append(_Candidate(index, transpose.input[0], value, None, producer))
    return found


def _match(plans: Mapping[str, LayerPlan], candidates: Sequence[_Candidate]) -> dict[int, LayerPlan]:
    """Node index -> the layer that replaces it. Raises if a layer has no node."""
    claimed: dict[int, LayerPlan] = {}
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
            " layer called in forward, and as a plain Linear (x @ W.T + b)? A layer whose output never reaches the"
            " model's outputs is left out of the trace (BERT's pooler when only last_hidden_state is used): leave"
            " it out of the compression `targets` (`exclude`), or export the module whose outputs use it (`module=`)"
        )
    return claimed


def rewrite_graph(graph_model, plans: Mapping[str, LayerPlan]) -> dict[str, int]:
    """Replace the float weights of ``plans``' layers in ``graph_model`` (an
    ``onnx.ModelProto``, changed in place) with their integer layouts.

    Returns:
        Per layer, how many nodes were rewritten (a layer called twice in ``forward`` has
        two, sharing one set of integer initializers).

    Raises:
        ValueError: a layer's weight is used by no ``MatMul``/``Gemm`` of the graph.
    """
    from onnx import helper

    graph = graph_model.graph
    if not plans:
        return {}
    initializers = {init.name: init for init in graph.initializer}
    opset = next((o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx")), 17)
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
        nodes = layer_nodes(plan, node.input[0], product, prefix, elem_type, new_initializers, opset)
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
    # A layer whose input stage the per-token int8 nodes replace must have every call rewritten.
    multiplied = {name for node in graph.node if node.op_type in ("MatMul", "Gemm", "Transpose", "Identity")
                  for name in node.input}
    unrewritten = sorted({plan.name for i, plan in claimed.items()
                          if plan.op == MATMUL_INTEGER and by_index[i].weight_name in multiplied})
    if unrewritten:
        raise ValueError(f"layer(s) {unrewritten} are also called through a MatMul this export does not rewrite;"
                         " export them with onnx_activations='float' (dynamic_int8_activations=False)")
    dropped = {by_index[i].weight_name for i in claimed} - used
    for container in (graph.initializer, graph.input, graph.value_info):
        kept = [v for v in container if v.name not in dropped]
        del container[:]
        container.extend(kept)

    uses_contrib = any(plan.op == MATMUL_NBITS for plan in claimed.values())
    if uses_contrib and not any(o.domain == MS_DOMAIN for o in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def check_onnx_fit(layers: Iterable[Tuple[str, nn.Module, QuantSpec]], int8_activations: bool) -> None:
    """What :func:`plan_layers` would refuse about ``layers`` (``(name, layer, grid)`` of
    each quantized weight), checked before anything is packed: a Linear grid no ONNX op
    holds, or int8 activations on a layer that is not float32.

    Raises:
        ValueError: naming the layer and the way out.
    """
    for name, layer, spec in layers:
        if not isinstance(layer, nn.Linear) or spec.bits not in INTEGER_BITS:
            continue  # exported as its dequantized float values
        dynamic = int8_activations and not _static_activations(layer)
        op = onnx_op(name, spec, dynamic)
        dtype = raw_weight(layer).dtype  # (not `layer.weight`: that computes the fake-quant weight)
        if dynamic and op == MATMUL_INTEGER and dtype != torch.float32:
            raise ValueError(
                f"layer {name!r} is {str(dtype).replace('torch.', '')}: onnx_activations='int8' rounds"
                " its activations on training's float32 grid; export a float32 model (model.float()), or leave"
                " onnx_activations='float'")


def _static_activations(layer: nn.Module) -> bool:
    stage = get_input_transform(layer, Stage.INPUT_QUANT)
    return isinstance(stage, StaticRangeObserver) and stage.enabled


__all__ = ["check_onnx_fit", "plan_layers", "rewrite_graph"]
