"""Packing a model for export, one layer at a time.

The model is read as it computes now: each quantized weight's codes and grid (computed
for that layer alone, encoded, written, dropped before the next), then every other
state-dict tensor (a transformed weight as its effective value, adapters merged), with
aliases for tensors that share storage (tied weights). :func:`pack_into` streams them into
``model.safetensors`` of a directory (see
:class:`~lightning_compress.formats.safetensors_stream.SafetensorsWriter`), so the export
holds the model plus about one layer; :func:`pack` builds the same bytes in memory (the
dry export).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lightning_compress.core.memory import ReleasePacer
from lightning_compress.core.reporting import format_table
from lightning_compress.core.targeting import (
    first_registration,
    layer_weights,
    parameter_key,
    shared_module_names,
    tied_parameter_names,
)
from lightning_compress.core.transforms import Stage, get_weight_transform, is_transformed, weight_before, weight_slots
from lightning_compress.formats import compressed_tensors as ct
from lightning_compress.formats.blocks import finite, quantize_rows
from lightning_compress.formats.errors import ExportError
from lightning_compress.formats.gguf import plan_gguf
from lightning_compress.formats.packed import (
    FORMAT_NAME, FORMAT_VERSION, METADATA_FILE, WEIGHTS_FILE, LayerGrid, PackedLayer, PackedModel, TensorReader,
    metadata_bytes)
from lightning_compress.formats.packed_encode import encode_layer, encode_tensor
from lightning_compress.formats.parity import ParityReport
from lightning_compress.formats.safetensors_stream import SafetensorsReader, SafetensorsWriter
from lightning_compress.formats.unsaved_buffers import unsaved_buffer_digests
from lightning_compress.lora.inject import ADAPTER_PARAMETERS
from lightning_compress.quant.activations import DynamicTokenQuantizer, StaticRangeObserver, input_quantizer_of
from lightning_compress.quant.fake_quant import QuantizedWeight, as_matrix
from lightning_compress.quant.weights import WeightFakeQuantizer

CONFIG_FILE = "config.json"


@dataclass
class ExportReport:
    """What an export wrote: per-layer rows, sizes, and the parity figures."""

    directory: Path
    rows: List[List[Any]]
    float32_bytes: int
    file_bytes: int
    parity: Optional[ParityReport]
    compressed_tensors: bool
    notes: List[str] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """float32 size of the weights over the size of ``model.safetensors``."""
        return self.float32_bytes / max(self.file_bytes, 1)

    def table(self) -> str:
        header = ["layer", "module", "params", "format", "sparsity", "bytes"]
        lines = [format_table(f"export {self.directory}", header, self.rows)]
        lines.append(
            f"model.safetensors: {self.file_bytes:,} bytes; float32: {self.float32_bytes:,} bytes"
            + (f" ({self.compression_ratio:.2f}x smaller)" if self.file_bytes < self.float32_bytes else
               f" ({self.file_bytes / max(self.float32_bytes, 1):.2f}x that: not smaller)")
        )
        if self.parity is not None:
            lines.append("parity: " + self.parity.summary())
        lines.extend(self.notes)
        return "\n".join(lines)


@dataclass
class Packing:
    """A packed model: the files to write (:func:`pack`: all of them; :func:`pack_into`: those
    not yet on disk), their metadata, the report, the quantized layers (for the ONNX and
    GGUF files; read back from disk after :func:`pack_into`) and ``model.gguf`` planned
    (or ``None``)."""

    files: Dict[str, bytes]
    body: Dict[str, Any]
    report: ExportReport
    layers: Mapping[str, PackedLayer]
    gguf: Any = None


def pack(model: nn.Module, out_dir: Path, *, sparse_threshold: Optional[float], compressed_tensors: Optional[bool],
         recipe: Optional[Mapping[str, Any]], dry: bool = False, formats: Sequence[str] = ("safetensors",),
         tokenizer: Any = None) -> Packing:
    """Encode ``model`` as the files of an export to ``out_dir``, in memory (``dry``: see
    :func:`plan_layers`), and plan ``model.gguf`` with ``tokenizer`` when ``formats`` has ``"gguf"``.

    Raises:
        ExportError: NaN/Inf, overflowing scales, a dtype or layer the format cannot store
            (or a model, grid or tokenizer ``model.gguf`` cannot hold).
    """
    writer = SafetensorsWriter()
    layers: Dict[str, PackedLayer] = {}
    body, report, ct_grids = _encode(model, out_dir, writer, sparse_threshold, compressed_tensors, recipe, dry, layers)
    weights = writer.to_bytes()
    _finish_body(body, report, *_digest(weights))
    files = {WEIGHTS_FILE: weights, METADATA_FILE: metadata_bytes(body)}
    if ct_grids is not None:
        files[CONFIG_FILE] = ct.config_json(model, ct_grids)
    return Packing(files, body, report, layers, plan_gguf(model, layers, tokenizer) if "gguf" in formats else None)


def pack_into(directory: Path, model: nn.Module, out_dir: Path, *, sparse_threshold: Optional[float],
              compressed_tensors: Optional[bool], recipe: Optional[Mapping[str, Any]],
              formats: Sequence[str] = ("safetensors",), tokenizer: Any = None) -> Packing:
    """:func:`pack`, with ``model.safetensors`` written into ``directory`` one layer at a
    time (fsynced); the returned ``files`` are the small ones, ``layers`` are read back
    from the file when asked for.

    Raises:
        ExportError: as :func:`pack`.
    """
    writer = SafetensorsWriter(directory)
    try:
        body, report, ct_grids = _encode(model, out_dir, writer, sparse_threshold, compressed_tensors, recipe, False,
                                         None)
        _finish_body(body, report, *writer.write_file(directory / WEIGHTS_FILE))
    finally:
        writer.close()
    path = directory / WEIGHTS_FILE
    layers = PackedModel(body, TensorReader(SafetensorsReader(path, str(path)))).layers
    files = {METADATA_FILE: metadata_bytes(body)}
    if ct_grids is not None:
        files[CONFIG_FILE] = ct.config_json(model, ct_grids)
    return Packing(files, body, report, layers, plan_gguf(model, layers, tokenizer) if "gguf" in formats else None)


def _encode(model, out_dir, writer: SafetensorsWriter, sparse_threshold, compressed_tensors, recipe, dry,
            kept: Optional[Dict[str, PackedLayer]]):
    """Encode every layer and tensor of ``model`` into ``writer`` (keeping the quantized
    layers in ``kept`` if given); returns the metadata body (without the weights' checksum),
    the report and, when the compressed-tensors layout is used, the layers' grids."""
    notes: List[str] = []
    grids = _plan_grids(model, dry)
    if not dry:
        _note_float_trained(model, notes)
    use_ct = ct.decide(model, grids, compressed_tensors, notes)
    if use_ct:
        sparse_threshold = None
    layer_meta, tensor_meta, rows, float32_bytes, pacer = {}, {}, [], 0, ReleasePacer()
    # A weight tied to another (a quantized lm_head and the float embedding) is stored twice
    # but weighs once in the float32 model the ratio is measured against.
    tied = {key: identity for identity, group in tied_parameter_names(model).items() for key in group}
    counted = set()

    def first_time(key: str) -> bool:
        if key not in tied:
            return True
        fresh = tied[key] not in counted
        counted.add(tied[key])
        return fresh

    for name, layer in quantized_layers(model, dry):
        encoded, entry = encode_layer(name, layer, sparse_threshold, pack_8bit=use_ct and ct.packs_codes(layer))
        for key, tensor in encoded.items():
            writer.add(key, tensor)
        pacer.done(layer.float32_bytes)  # this layer's temporaries: see lightning_compress.core.memory
        layer_meta[name] = entry
        rows.append([name, layer.module, layer.weight.codes.numel(),
                     f"{layer.weight.spec.describe()} {entry['packing']}", _sparsity_text(entry), entry["bytes"]])
        if first_time(parameter_key(name, layer.param)):
            float32_bytes += layer.weight.codes.numel() * 4
        if kept is not None:
            kept[name] = layer
    aliases: Dict[str, str] = {}
    for key, tensor, source in float_tensors(model):
        if source is not None:
            aliases[key] = source
            continue
        encoded, entry = encode_tensor(key, tensor, sparse_threshold)
        for name, part in encoded.items():
            writer.add(name, part)
        tensor_meta[key] = entry
        if first_time(key):
            float32_bytes += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
        if entry["sparsity"] != "dense":
            size = sum(t.numel() * t.element_size() for t in encoded.values())
            rows.append([key, "tensor", tensor.numel(), entry["dtype"], _sparsity_text(entry), size])
    body = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_versions": _versions(),
        "recipe": None if recipe is None else json.loads(json.dumps(recipe, default=str)),
        "layers": layer_meta,
        "tensors": tensor_meta,
        "aliases": aliases,
        "compressed_tensors": use_ct,
        "unsaved_buffers": unsaved_buffer_digests(model),
    }
    report = ExportReport(out_dir, rows, float32_bytes, 0, None, use_ct, notes)
    return body, report, grids if use_ct else None


def _note_float_trained(model: nn.Module, notes: List[str]) -> None:
    """Warn (and note in the report) when quantized layers export with their fake
    quantization off: nothing computed on that grid before now (QAT's ``start_step`` not
    reached: a run with no training step, a checkpoint saved before the start), so their
    codes are round to nearest of weights trained in float: PTQ, not QAT."""
    off = [key for key, _module, _param, quantizer in plan_layers(model) if not quantizer.enabled]
    if off:
        note = (f"{len(off)} quantized layer(s) ({', '.join(off[:3])}{', ...' if len(off) > 3 else ''}) never computed"
                " on their grid: their fake quantization is off (QuantizationAwareTraining's start_step not reached),"
                " so they are packed as round to nearest of weights trained in float (PTQ), not as trained with QAT")
        notes.append(note)
        warnings.warn(note, UserWarning, stacklevel=2)


def _finish_body(body: Dict[str, Any], report: ExportReport, sha256: str, size: int) -> None:
    body["weights_sha256"] = sha256
    report.file_bytes = size


def _digest(data: bytes) -> Tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def plan_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, WeightFakeQuantizer]]:
    """``(weight key, layer, parameter, quantizer)`` of every fake-quantized weight, in
    the model's module order, without computing anything."""
    for name, module in model.named_modules():
        for key, param in layer_weights(name, module).items():
            quantizer = get_weight_transform(module, Stage.FAKE_QUANT, param)
            if isinstance(quantizer, WeightFakeQuantizer):
                yield key, module, param, quantizer


def _plan_grids(model: nn.Module, dry: bool) -> Dict[str, PackedLayer]:
    """The quantized layers as the metadata will describe them (grids, no codes): what
    the compressed-tensors decision reads before anything is encoded. ``dry`` (a check
    before training): static int8 activations not calibrated yet are packed weight-only.

    Raises:
        ExportError: a layer's static int8 activations were never calibrated.
    """
    grids = {}
    for key, module, param, quantizer in plan_layers(model):
        weight = getattr(module, "_parameters", {}).get(param)
        shape = tuple(weight.shape) if weight is not None else ()
        dtype = weight.dtype if weight is not None else torch.float32
        grids[key] = PackedLayer(LayerGrid(quantizer.spec, shape, dtype), type(module).__name__,
                                 *_activations(key, module, dry), param)
    return grids


def quantized_layers(model: nn.Module, dry: bool = False) -> Iterator[Tuple[str, PackedLayer]]:
    """Each quantized weight of ``model`` as it computes now: its exact codes and grid,
    computed one layer at a time (``dry``: see :func:`_plan_grids`).

    Raises:
        ExportError: NaN/Inf in a weight, or scales that overflow their dtype.
    """
    for key, module, param, quantizer in plan_layers(model):
        source = weight_before(module, Stage.FAKE_QUANT, param).detach()
        _check_finite(key, source)
        q = _quantized(source, quantizer)
        if torch.isinf(q.scale).any() and not torch.isnan(q.scale).any():
            # Finite weights, infinite scales: the grid's float16/bfloat16 scales overflowed.
            raise ExportError(
                f"layer {key!r}: its weights are finite but their {q.spec.scale_dtype} scales overflow (largest"
                f" |weight| {float(source.abs().max()):.3g}); train with"
                " QuantizationAwareTraining(scale_dtype='float32'), or exclude the layer, and export again"
            )
        _check_finite(key, q.scale)
        yield key, PackedLayer(q, type(module).__name__, *_activations(key, module, dry), param)
        del q, source


def _quantized(weight: Tensor, quantizer: WeightFakeQuantizer) -> QuantizedWeight:
    """What :func:`~lightning_compress.quant.weights.quantized_weights` gives for one weight
    (the grid the fake quantizer uses now, the codes it rounds to), with the codes computed
    a row block at a time (see :mod:`~lightning_compress.formats.blocks`)."""
    matrix = as_matrix(weight.float())
    scale, zero_point = quantizer.qparams(weight)
    grid_shape = (1, 1) if quantizer.spec.granularity == "tensor" else (matrix.shape[0], -1)
    return QuantizedWeight(codes=quantize_rows(matrix, scale, zero_point, quantizer.spec),
                           scale=scale.detach().reshape(grid_shape).clone(),
                           zero_point=zero_point.reshape(grid_shape).clone(),
                           spec=quantizer.spec, shape=tuple(weight.shape), dtype=weight.dtype)


def float_tensors(model: nn.Module) -> Iterator[Tuple[str, Optional[Tensor], Optional[str]]]:
    """``(key, tensor, None)`` for every state-dict tensor of ``model`` that is not a
    quantized weight (a transformed weight as its effective value, computed when its turn
    comes; LoRA adapters left out, they are merged), or ``(key, None, source)`` for one
    that shares storage with an earlier one (tied weights). A module registered under
    several names is stored under its first: its other names' tensors are aliases of those,
    and its quantized weight is left out under them (the loader puts the packed module
    under every name).

    Raises:
        ExportError: NaN (or, in a parameter, Inf) values.
    """
    modules = dict(model.named_modules())
    quantized = {parameter_key(key, param) for key, _, param, _ in plan_layers(model)}
    state = model.state_dict()
    effective = {}  # key -> (module, slot): read when its turn comes
    for name, module in modules.items():
        if not is_transformed(module):
            continue
        prefix = f"{name}." if name else ""
        for extra in ADAPTER_PARAMETERS:
            state.pop(prefix + extra, None)
        for slot in weight_slots(module):
            effective[prefix + slot] = (module, slot)
            state.setdefault(prefix + slot, None)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    # Only storage the model itself holds can be shared: a computed effective weight is new,
    # and its address may be reused by the next one once it is freed.
    owned = {_identity(tensor) for key, tensor in state.items()
             if key not in effective and key not in quantized and tensor.numel()}
    seen: Dict[tuple, str] = {}
    shared, written = shared_module_names(model), {}  # written: key -> the stored key it reads
    for key in state:
        first = first_registration(key, shared)
        if first != key:  # a module registered under several names: stored once, under its first
            if first in written:
                written[key] = written[first]
                yield key, None, written[first]
            continue  # quantized, or a merged adapter: the loader puts the module under every name
        if key in quantized:
            continue
        if key in effective:
            module, slot = effective[key]
            with torch.no_grad():
                tensor = getattr(module, slot).detach()
        else:
            tensor = state[key].detach()
        if tensor.is_floating_point():  # a buffer may hold infinities (a causal mask of -inf), never NaN
            _check_finite(key, tensor, allow_infinite=key not in parameters)
        identity = _identity(tensor) if tensor.numel() else None
        if identity in seen:
            written[key] = seen[identity]
            yield key, None, seen[identity]
            continue
        if identity in owned:
            seen[identity] = key
        written[key] = key
        yield key, tensor.cpu(), None


def collect(model: nn.Module, *, dry: bool = False):
    """``(layers, tensors, aliases)``: :func:`quantized_layers` and :func:`float_tensors`
    gathered in memory (what the GGUF and ONNX writers read)."""
    layers = dict(quantized_layers(model, dry))
    tensors, aliases = {}, {}
    for key, tensor, source in float_tensors(model):
        if source is None:
            tensors[key] = tensor
        else:
            aliases[key] = source
    return layers, tensors, aliases


def _identity(tensor: Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)


def _activations(name: str, module: nn.Module, dry: bool = False):
    quantizer = input_quantizer_of(module)
    if isinstance(quantizer, DynamicTokenQuantizer):
        return "int8_dynamic", None
    if isinstance(quantizer, StaticRangeObserver):
        if quantizer.low is None and dry:  # calibrated by training; uncalibrated, it passes inputs through
            return None, None
        if quantizer.low is None:
            raise ExportError(
                f"layer {name!r} has static int8 activations that were never calibrated; train past QAT's"
                " start_step (the observers calibrate during training) before exporting"
            )
        scale, zero_point = quantizer.qparams()
        return "int8_static", (scale.detach().cpu(), zero_point.cpu())
    return None, None


def _check_finite(name: str, tensor: Tensor, allow_infinite: bool = False) -> None:
    if finite(tensor, allow_infinite):
        return
    bad = tensor.isnan() if allow_infinite else ~torch.isfinite(tensor)
    if tensor.is_floating_point() and bad.any():
        what = "NaN" if allow_infinite else "NaN/Inf"
        raise ExportError(f"{name!r} holds {int(bad.sum())} {what} value(s); nothing was exported. Fix the training run"
                          " (lower the learning rate, check the data) and export again")


def _sparsity_text(entry: Mapping[str, Any]) -> str:
    """How a tensor is stored, and its zeros: a pruned layer whose codes are stored
    whole (a bitmask would not be smaller) says how much of it is pruned."""
    total = 1
    for dim in entry["shape"]:
        total *= dim
    zeros = 1 - entry.get("kept", total) / max(total, 1)
    if entry["sparsity"] == "dense":
        return f"dense, {zeros:.0%} zeros" if entry.get("kept", total) < total else "dense"
    return f"bitmask {zeros:.0%}"


def _versions() -> Dict[str, str]:
    versions = {"torch": torch.__version__}
    for package in ("lightning-compress", "lightning", "safetensors", "torchao"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


__all__ = ["CONFIG_FILE", "ExportReport", "Packing", "collect", "float_tensors", "pack", "pack_into", "plan_layers",
           "quantized_layers"]
