"""Writing and running the ``.onnx`` files: :func:`export_onnx` and :func:`run_onnx`.

:func:`export_onnx` exports a model with PyTorch's ONNX exporter, then rewrites the graph
with the ``onnx`` package (:mod:`~lightning_compress.formats.onnx.graph`) so that every
Linear named in ``quantized`` stores its weight as the exact integer codes the fake
quantization used (:func:`~lightning_compress.quant.weights.quantized_weights`), not as
floats, in the layouts of :mod:`~lightning_compress.formats.onnx.layouts`.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``):
it needs nothing beyond ``torch`` and ``onnx``, keeps ``fc1.weight``-like initializer names
for ``Gemm`` nodes and folds the weight transposes of 3-D ``MatMul`` into initializers.
The dynamo-based exporter (which needs the ``onnxscript`` package) is used only if the
TorchScript one is unavailable.

Dimension 0 of every input and output is exported as a dynamic ``batch`` dimension.

The example inputs are positional, whatever they hold: a dict among them is one argument
(a ``forward(self, batch)`` taking a dict), never keyword arguments. PyTorch's exporter
reads a trailing dict in its ``args`` as keyword arguments, so one is passed with the
empty dict it documents for that case after it. Tensors inside dicts, tuples and lists
are inputs of the graph, named ``input_<i>`` in the order :func:`run_onnx` feeds them.
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress.core.atomic import atomic_write_bytes, replace_file
from lightning_compress.core.attention import fast_path_disabled
from lightning_compress.core.notes import add_note
from lightning_compress.core.transforms import Stage, detach_all, get_input_transform, remove_input_transform, weight_slots
from lightning_compress.formats.errors import UnexportableModel
from lightning_compress.formats.onnx.exporter_gaps import cast_bool_cumsum, missing_symbolics
from lightning_compress.formats.onnx.graph import plan_layers, rewrite_graph
from lightning_compress.formats.onnx.layouts import MATMUL_INTEGER, LayerPlan
from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.nf4 import nf4_deepcopy_memo

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


def export_onnx(
    model: nn.Module,
    example_inputs: tuple,
    path,
    quantized: Mapping[str, QuantizedWeight],
    *,
    opset: int | None = None,
    dynamic_int8_activations: bool = False,
    dynamic_sequence: bool = False,
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
        dynamic_int8_activations: compute int8 layers with ``MatMulInteger`` on each
            token rounded to uint8 on training's int8 dynamic grid (faster; the codes a
            layer trained with int8 dynamic activations trained with, an 8-bit rounding for
            a weight-only layer) instead of weight-only QDQ (exact), and int4 layers'
            ``MatMulNBits`` with ``accuracy_level=4`` (activations rounded to int8 per
            block, int8 dot products) instead of float activations (exact). Layers trained
            with static int8 activations stay QDQ.

        dynamic_sequence: also export dimension 1 of each input and output with two or
            more dimensions as dynamic (``input_0_length``, ...), not only dimension 0. The trace runs
            at the example's length: a model that turns it into a constant computes wrongly
            at another, so check the file there (the export's check does).

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
    plans = plan_layers(model, quantized, dynamic_int8_activations)

    with tempfile.TemporaryDirectory(prefix="lc-onnx-") as workdir:
        float_path = Path(workdir) / "float.onnx"
        _export_float(model, example_inputs, float_path, plans, opset, dynamic_sequence)
        float_bytes = _size_with_data(float_path)
        import onnx

        graph_model = onnx.load(str(float_path))
    cast_bool_cumsum(graph_model)
    nodes = rewrite_graph(graph_model, plans)
    external = save_onnx(graph_model, path)
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

    ``inputs`` are positional (torch tensors or numpy arrays, or tuples, lists and dicts
    of them, flattened in order), matched to the graph inputs in order, or by their
    ``input_<i>`` names when the exporter left some out (a tensor the model does not use,
    such as the labels in a dict batch); non-tensor entries (baked into the graph by the
    exporter) are skipped.

    The session keeps int8 QDQ layers weight-only: onnxruntime otherwise fuses
    ``DequantizeLinear`` + ``MatMul`` into a ``MatMulNBits`` with ``accuracy_level=4``,
    which rounds the activations to int8 too (about 47 dB SQNR instead of float rounding
    on a small MLP). ``session_config`` entries (``SessionOptions.add_session_config_entry``)
    override that, e.g. ``{"session.qdq_matmulnbits_accuracy_level": "4"}`` for speed.
    """
    import onnxruntime as ort

    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x for x in graph_tensors(inputs)]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    config = {"session.qdq_matmulnbits_accuracy_level": "0", **(session_config or {})}
    for key, value in config.items():
        options.add_session_config_entry(key, str(value))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    indices = [re.fullmatch(r"input_(\d+)", spec.name) for spec in graph_inputs]
    if len(graph_inputs) < len(arrays) and all(m is not None and int(m[1]) < len(arrays) for m in indices):
        return session.run(None, {spec.name: arrays[int(m[1])] for spec, m in zip(graph_inputs, indices)})
    if len(graph_inputs) != len(arrays):
        raise ValueError(
            f"the graph takes {len(graph_inputs)} input(s) ({[i.name for i in graph_inputs]}),"
            f" got {len(arrays)} tensor(s)"
        )
    return session.run(None, {spec.name: array for spec, array in zip(graph_inputs, arrays)})


# --------------------------------------------------------------------------- torch export


def _export_copy(model: nn.Module, plans: Mapping[str, LayerPlan]) -> nn.Module:
    # A copy, so the caller's model keeps its transforms; the memo keeps an attached
    # Trainer (and all it holds) out of the copy.
    trainer = model.__dict__.get("_trainer")
    memo = {id(trainer): None} if trainer is not None else {}
    memo.update(nf4_deepcopy_memo(model))  # QLoRA bases, copied exactly
    clone = copy.deepcopy(model, memo)
    # Fold every weight transform (fake quant, masks, adapters) into a plain weight, so the
    # exporter sees a constant initializer instead of tracing round/clamp ops; quantized
    # layers get exactly q.dequantize(), which the graph rewrite then finds by value.
    # Activation quantization stays: it is traced into the graph as fake-quant ops.
    effective = {}
    with torch.no_grad():
        for name, module in clone.named_modules():
            for slot in weight_slots(module):
                if name in plans and slot == "weight":
                    weight = module._parameters["weight"]
                    value = torch.from_numpy(plans[name].dequantized).to(weight.device, weight.dtype)
                else:
                    value = getattr(module, slot).detach().clone()
                effective[(name, slot)] = value
    detach_all(clone, keep_inputs=True)
    modules = dict(clone.named_modules())
    for name, plan in plans.items():
        # The per-token int8 nodes that replace the layer's MatMul compute its dynamic input stage.
        if plan.op == MATMUL_INTEGER and get_input_transform(modules[name], Stage.INPUT_QUANT) is not None:
            remove_input_transform(modules[name], Stage.INPUT_QUANT)
    for (name, slot), value in effective.items():
        modules[name]._parameters[slot] = nn.Parameter(value, requires_grad=False)
    return clone.eval()


def map_graph_tensors(value: Any, fn) -> Any:
    """``value`` with ``fn`` applied to each tensor (and numpy array) in it, depth first, a
    dict's in its order: the order the exporter makes them graph inputs in."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return fn(value)
    if isinstance(value, (list, tuple)):
        items = [map_graph_tensors(item, fn) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a NamedTuple: its fields
    if isinstance(value, dict):
        return {key: map_graph_tensors(item, fn) for key, item in value.items()}
    return value


def graph_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors (and numpy arrays) in ``value``, in :func:`map_graph_tensors`'s order."""
    found: list = []
    map_graph_tensors(value, found.append)
    return found


def _python_scalars(value: Any, where: str) -> list[str]:
    """Where ``value`` holds Python numbers or strings (``output['steps'] (int)``)."""
    if isinstance(value, (bool, int, float, complex, str)):
        return [f"{where} ({type(value).__name__})"]
    if isinstance(value, (list, tuple)):
        return [found for index, item in enumerate(value) for found in _python_scalars(item, f"{where}[{index}]")]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _python_scalars(item, f"{where}[{key!r}]")]
    return []


def _export_float(
    model: nn.Module, example_inputs: tuple, path: Path, plans: Mapping[str, LayerPlan], opset: int | None,
    dynamic_sequence: bool = False,
) -> None:
    clone = _export_copy(model, plans)
    # PyTorch's fused attention ops have no ONNX form, and skip the layers' input stages.
    with fast_path_disabled():
        _trace(clone, example_inputs, path, opset, dynamic_sequence)


def _trace(clone: nn.Module, example_inputs: tuple, path: Path, opset: int | None, dynamic_sequence: bool) -> None:
    with torch.no_grad():
        returned = clone(*example_inputs)
    constants = _python_scalars(returned, "output")
    if constants:  # the tracer's own error is about "observable data dependence"
        raise UnexportableModel(
            f"PyTorch's ONNX exporter takes tensors (in tuples, lists and dicts) as outputs; {type(clone).__name__}"
            f" returns Python values: {', '.join(constants[:4])}. Return them as tensors, or leave them out of"
            " `forward`'s result, or leave 'onnx' out of `formats`"
        )
    outputs = graph_tensors(returned)
    tensor_inputs = graph_tensors(example_inputs)
    input_names = [f"input_{i}" for i in range(len(tensor_inputs))]
    output_names = [f"output_{i}" for i in range(len(outputs))]
    dynamic_axes = {
        # One name per tensor: an encoder-decoder's two inputs have lengths of their own.
        name: {0: "batch", 1: f"{name}_length"} if dynamic_sequence and tensor.dim() > 1 else {0: "batch"}
        for name, tensor in zip(input_names + output_names, tensor_inputs + outputs)
        if tensor.dim() > 0
    }
    try:
        with missing_symbolics(opset):
            _export_torchscript(clone, example_inputs, path, input_names, output_names, dynamic_axes, opset)
    except (torch.onnx.OnnxExporterError, AssertionError) as unsupported:
        # Its message goes on with the whole traced graph; the first line says what failed. (An
        # op it has no conversion for asserts: scaled_dot_product_attention with enable_gqa.)
        reason = str(unsupported).splitlines()[0].split(" [Caused by")[0].split(" Please feel free")[0].rstrip(". ")
        raise UnexportableModel(
            f"PyTorch's ONNX exporter cannot export this model: {reason}. Leave 'onnx' out of `formats`"
            " (the packed safetensors export does not need it), or change that layer"
        ) from None
    except RuntimeError as error:
        unsupported_type = _UNSUPPORTED_TYPE.search(str(error))
        if unsupported_type is None:
            raise
        # An output that is not tensors: a transformers model with use_cache on returns its cache.
        raise UnexportableModel(
            f"PyTorch's ONNX exporter takes tensors (in tuples, lists and dicts) as outputs; {type(clone).__name__}"
            f" returns a {unsupported_type.group(1)}. A transformers model returns its key/value cache unless"
            " `model.config.use_cache = False`; otherwise leave 'onnx' out of `formats`"
        ) from None
    except (TypeError, NotImplementedError, AttributeError) as legacy_error:
        if isinstance(legacy_error, TypeError) and _CALL_MISMATCH.search(str(legacy_error)):
            # The exporter called forward with other arguments than the call above did.
            raise UnexportableModel(
                f"PyTorch's ONNX exporter could not call {type(clone).__name__}.forward with the example inputs"
                f" ({type(legacy_error).__name__}: {legacy_error}). It takes a tuple of tensors (and of tuples, lists"
                " and dicts of them) as positional inputs: pass CompressedExport an `input_fn` returning one, or"
                " leave 'onnx' out of CompressedExport(formats=...)"
            ) from legacy_error
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


# The TorchScript tracer's message for an input or output that is not tensors.
_UNSUPPORTED_TYPE = re.compile(r"received an (?:input|output) of unsupported type: (\w+)")
# Python's messages for a call that does not fit a signature.
_CALL_MISMATCH = re.compile(r"\(\) (missing \d+ required|takes \d+|takes from|got an unexpected keyword|got multiple"
                            r" values|got some positional-only)")


def _export_torchscript(model, example_inputs, path, input_names, output_names, dynamic_axes, opset) -> None:
    if example_inputs and isinstance(example_inputs[-1], dict):
        # torch.onnx.export reads a trailing dict as keyword arguments; after it, the empty
        # dict its documentation gives for this case keeps the one before it positional.
        example_inputs = (*example_inputs, {})
    # The exporter passes forward's default values after the inputs given, as more graph
    # inputs: transformers' `logits_to_keep=0` became a graph input, whose tensor 0 then
    # kept the logits of one position instead of all. The copy's forward takes the inputs
    # given, so the defaults stay Python values inside the traced call.
    forward = model.forward
    model.forward = lambda *inputs: forward(*inputs)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but still the one without extra
        # dependencies; its warnings say nothing the user can act on here.
        warnings.simplefilter("ignore")
        try:
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
        except RuntimeError as error:
            if any(p.dtype == torch.bfloat16 for p in model.parameters()):
                # e.g. transformers' attention masks: "ScalarType ComplexDouble is an unexpected tensor scalar type"
                add_note(error, "lightning_compress: the model computes in bfloat16, which PyTorch's ONNX exporter"
                               " fails to trace for some models (a float32 model of the same layers traces): leave"
                               " 'onnx' out of `formats`, or export a float32 copy of the trained model afterwards"
                               " (lightning_compress.export(copy.deepcopy(model).float(), ..., formats=[...,"
                               " 'onnx']))")
            raise


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


# --------------------------------------------------------------------------- writing


def save_onnx(graph_model, path: Path) -> Path | None:
    """Write the ``onnx.ModelProto`` ``graph_model`` to ``path`` atomically; returns the
    external data file (``<name>.data`` beside it) when the graph is too big for one
    protobuf message, else ``None``."""
    import onnx

    path = Path(path)
    if graph_model.ByteSize() < _PROTOBUF_LIMIT:
        atomic_write_bytes(path, graph_model.SerializeToString())
        return None
    # Over 2 GiB: tensors go to `<name>.data`. Both files are written in a temporary
    # folder beside the target, then renamed, data first, so the graph never points at a
    # half-written data file.
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent, ignore_cleanup_errors=True) as workdir:
        workdir = Path(workdir)
        onnx.save_model(
            graph_model,
            str(workdir / path.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        replace_file(workdir / data.name, data)
        replace_file(workdir / path.name, path)
    return data


__all__ = ["OnnxExportReport", "export_onnx", "run_onnx", "save_onnx"]
