"""The packed-model directory: ``model.safetensors`` + ``compression.json``, no pickle.

Tensor names follow compressed-tensors for every quantized layer (Linear and Embedding
load in ``transformers``; Conv uses the same names as our documented extension). For a
layer whose state-dict prefix is ``p.``:

=========================  =====================================================
``p.weight``               int8 codes in the weight's shape (8-bit, dense)
``p.weight_packed``        int32, codes densely packed along the input dimension
                           (see :mod:`lightning_compress.quant.packing`), ``[out,
                           ceil(in * bits / 32)]``; 1-D when bitmask-sparse; 8-bit
                           too in a compressed-tensors ``pack-quantized`` layer
``p.weight_shape``         int64, the weight's shape (packed layers)
``p.weight_scale``         ``scale_dtype``: ``[out, groups]``, ``[out, 1]`` per
                           channel, ``[1]`` per tensor
``p.weight_zero_point``    asymmetric only: int8 codes shaped like the scale; packed
                           along the output dimension for packed channel/group layers
``p.weight_bitmask``       sparse layers: uint8, one bit per weight (row-major, low
                           bit first), set where the code is not the zero point; the
                           values hold only those codes, in order
``p.input_scale``,         static int8 activations: the frozen input range
``p.input_zero_point``
``p.in_proj_weight*``      ``p.weight*`` of an attention layer's input projection (entry ``"param"``);
                           ``p.weight_ih_l0*`` (entry ``"p.weight_ih_l0"``): a recurrent weight matrix
``k_bitmask``,             a float tensor ``k`` stored sparse
``k_values``
=========================  =====================================================

Everything else keeps its name, dtype and values. ``compression.json`` holds the format
version, per-layer bits/granularity/group size/symmetry/packing/sparsity, the recipe, the
library versions, and SHA-256 checksums of the weights file and of itself: a reader
refuses any byte that changed, so corruption cannot give a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from reprlib import repr as _short
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from lightning_compress.core.targeting import is_recurrent_weight, parameter_key
from lightning_compress.formats.errors import ExportError, PackedFormatError, read_packed_file
from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.packing import pack_codes, packed_words, unpack_codes
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.sparsity.masks import pack_mask, unpack_mask

FORMAT_NAME = "lightning-compress/packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
LAYER_PARAMS = ("weight", "in_proj_weight")  # the parameters a packed layer may hold
METADATA_FILE = "compression.json"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype in _DTYPES.values():
        return next(name for name, value in _DTYPES.items() if value == dtype)
    raise ExportError(f"cannot store a tensor of dtype {dtype}; supported: {sorted(_DTYPES)}")


@dataclass
class PackedLayer:
    """One quantized layer as stored: its codes and grid, plus how the runtime should
    treat its input (``activations``: ``None``, ``"int8_dynamic"`` or ``"int8_static"``).
    ``param``: the quantized parameter (``"in_proj_weight"`` of an attention layer)."""

    weight: QuantizedWeight
    module: str
    activations: Optional[str] = None
    input_qparams: Optional[tuple] = None  # (scale [1] float32, zero point [1] int32), static only
    param: str = "weight"


@dataclass
class PackedModel:
    """What a packed directory holds, decoded: quantized layers by module name, every other
    state-dict tensor by key (sparse ones made dense again), and the metadata."""

    layers: Dict[str, PackedLayer]
    tensors: Dict[str, Tensor]
    metadata: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- encode
def _scale_shape(q: QuantizedWeight) -> tuple:
    if q.spec.granularity == "tensor":
        return (1,)
    return (q.shape[0], -1)


def encode_layer(name: str, layer: PackedLayer, sparse_threshold: Optional[float], pack_8bit: bool = False):
    """Tensors and metadata entry of one quantized layer (``pack_8bit``: 8-bit codes too in int32)."""
    q, spec, p = layer.weight, layer.weight.spec, (f"{name}." if name else "")
    w = parameter_key(name, layer.param)  # the weight's tensors: `p.weight`, `p.weight_scale`, ...
    matrix = q.codes.reshape(q.shape[0], -1)
    zero = q.zero_point.reshape(-1, 1).to(torch.int8)
    width = matrix.numel() // zero.numel()
    kept = (matrix.reshape(-1, width) != zero).reshape(-1)
    bits = spec.bits
    packed = bits < 8 or pack_8bit
    dense_bits = matrix.shape[0] * packed_words(matrix.shape[1], bits) * 32 if packed else matrix.numel() * 8
    sparse_bits = math.ceil(matrix.numel() / 8) * 8 + packed_words(int(kept.sum()), bits) * 32
    sparse = _use_sparse(matrix.numel(), int(kept.sum()), dense_bits, sparse_bits, sparse_threshold)
    tensors: Dict[str, Tensor] = {}
    if sparse:
        values = matrix.reshape(-1)[kept]
        tensors[w + "_bitmask"] = pack_mask(kept)
        if packed:
            tensors[w + "_packed"] = pack_codes(values, bits)
        else:
            tensors[w] = values.contiguous()
    elif packed:
        tensors[w + "_packed"] = pack_codes(matrix, bits)
    else:
        tensors[w] = q.codes.reshape(q.shape).contiguous()
    if packed:
        tensors[w + "_shape"] = torch.tensor(q.shape, dtype=torch.int64)
    scale_dtype = _DTYPES[spec.scale_dtype]
    tensors[w + "_scale"] = q.scale.reshape(_scale_shape(q)).to(scale_dtype).contiguous()
    if not spec.symmetric:
        zero_point = q.zero_point.reshape(_scale_shape(q)).to(torch.int8)
        if packed and spec.granularity != "tensor":
            zero_point = pack_codes(zero_point.t().contiguous(), bits).t()
        tensors[w + "_zero_point"] = zero_point.contiguous()
    if layer.activations == "int8_static":
        scale, zero_point = layer.input_qparams
        tensors[p + "input_scale"] = scale.reshape(1).float()
        tensors[p + "input_zero_point"] = zero_point.reshape(1).to(torch.int8)
    entry = {
        "module": layer.module,
        **({} if layer.param == "weight" else {"param": layer.param}),
        "shape": list(q.shape),
        "dtype": dtype_name(q.dtype),
        "bits": bits,
        "granularity": spec.granularity,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "scale_dtype": spec.scale_dtype,
        "packing": "int32-dense" if packed else "int8",
        "sparsity": "bitmask" if sparse else "dense",
        "kept": int(kept.sum()),
        "activations": layer.activations,
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    return tensors, entry


def encode_tensor(key: str, tensor: Tensor, sparse_threshold: Optional[float]) -> tuple[dict, dict]:
    """Tensors and metadata entry of one unquantized state-dict tensor."""
    tensor = tensor.detach().cpu().contiguous()
    kept = (tensor != 0).reshape(-1)
    count = int(kept.sum())
    bits = tensor.element_size() * 8
    sparse = tensor.is_floating_point() and _use_sparse(
        tensor.numel(), count, tensor.numel() * bits, math.ceil(tensor.numel() / 8) * 8 + count * bits, sparse_threshold
    )
    entry = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "sparsity": "dense",
             **({"infinite": True} if tensor.is_floating_point() and tensor.isinf().any() else {})}  # -inf masks
    if not sparse:
        return {key: tensor}, entry
    entry.update(sparsity="bitmask", kept=count)
    return {key + "_bitmask": pack_mask(kept), key + "_values": tensor.reshape(-1)[kept].contiguous()}, entry


def _use_sparse(numel: int, kept: int, dense_bits: int, sparse_bits: int, threshold: Optional[float]) -> bool:
    if threshold is None or numel == 0:
        return False
    return 1 - kept / numel >= threshold and sparse_bits < dense_bits


# ---------------------------------------------------------------------- decode
class _Reader:
    """Takes tensors out of a loaded safetensors dict, checking names, dtypes and shapes.
    ``max_numel`` bounds what a metadata shape may claim: no valid entry stores fewer
    than one bit per element, so nothing larger fits in a file of that many bytes / 8."""

    def __init__(self, tensors: Dict[str, Tensor], max_numel: int) -> None:
        self.tensors = dict(tensors)
        self.max_numel = max_numel

    def take(self, key: str, dtype: torch.dtype, shape: Optional[tuple] = None) -> Tensor:
        if key not in self.tensors:
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key!r} is missing")
        tensor = self.tensors.pop(key)
        if tensor.dtype != dtype:
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key!r} is {tensor.dtype}, expected {dtype}")
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        return tensor


def _field(entry: Mapping, key: str, kind, where: str):
    value = entry.get(key) if isinstance(entry, Mapping) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PackedFormatError(f"{METADATA_FILE}: {where} needs {key!r} of type {kind.__name__}, got {_short(value)}")
    return value


def entry_shape(entry: Mapping, where: str, max_numel: int, *, positive: bool = False) -> tuple:
    """An entry's ``shape``: a list of ints >= 0 (>= 1 and not empty with ``positive``)
    holding at most ``max_numel`` elements (see :class:`_Reader`)."""
    shape, low = entry.get("shape"), int(positive)
    if not isinstance(shape, list) or (positive and not shape) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= low for d in shape
    ):
        kind = "positive" if positive else "non-negative"
        raise PackedFormatError(f"{METADATA_FILE}: {where} has a bad shape {_short(shape)}; expected a list of {kind} ints")
    if math.prod(shape) > max_numel:
        raise PackedFormatError(f"{METADATA_FILE}: {where} has shape {_short(shape)}, more than {WEIGHTS_FILE} can hold")
    return tuple(shape)


def entry_dtype(entry: Mapping, where: str, *, floating: bool = False) -> torch.dtype:
    """An entry's ``dtype`` (a name from the table above; a float one with ``floating``)."""
    name = entry.get("dtype")
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None or floating and not dtype.is_floating_point:
        allowed = sorted(n for n, d in _DTYPES.items() if d.is_floating_point or not floating)
        raise PackedFormatError(f"{METADATA_FILE}: {where} has a bad dtype {_short(name)}; expected one of {allowed}")
    return dtype


def entry_count(entry: Mapping, key: str, where: str, high: int) -> int:
    """An int field of an entry (``kept``, ``bytes``) in ``[0, high]``."""
    value = _field(entry, key, int, where)
    if not 0 <= value <= high:
        raise PackedFormatError(f"{METADATA_FILE}: {where} has {key!r} = {_short(value)}, outside [0, {high}]")
    return value


def _finite(key: str, tensor: Tensor, infinite: bool = False) -> Tensor:
    """``tensor``, checked: no NaN, and no infinity unless its entry says it holds some."""
    if tensor.is_floating_point() and (tensor.isnan().any() if infinite else not torch.isfinite(tensor).all()):
        raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key!r} holds NaN or Inf values, which the export never"
                                " writes; the file was edited or corrupted: export the model again")
    return tensor


def decode_layer(name: str, entry: Mapping, reader: _Reader) -> PackedLayer:
    where = f"layer {name!r}"
    fields = {key: _field(entry, key, kind, where)
              for key, kind in (("bits", int), ("granularity", str), ("symmetric", bool), ("scale_dtype", str))}
    try:
        spec = QuantSpec(group_size=entry.get("group_size"), **fields)
    except ValueError as err:
        raise PackedFormatError(f"{METADATA_FILE}: {where}: {err}") from None
    shape = entry_shape(entry, where, reader.max_numel, positive=True)
    dtype = entry_dtype(entry, where, floating=True)
    rows, cols = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
    numel, p, bits = rows * cols, (f"{name}." if name else ""), spec.bits
    param = entry.get("param", "weight")
    recurrent = isinstance(param, str) and is_recurrent_weight(param) and name.rpartition(".")[2] == param
    if param not in LAYER_PARAMS and not recurrent:
        raise PackedFormatError(f"{METADATA_FILE}: {where} has unknown param {_short(param)};"
                                f" expected one of {list(LAYER_PARAMS)} or a recurrent layer's weight_ih_l<k>...")
    w = parameter_key(name, param)
    packed = bits < 8 or entry.get("packing") == "int32-dense"  # 8-bit codes packed into int32 words too
    if spec.granularity == "group" and cols % spec.group_size:
        raise PackedFormatError(f"{METADATA_FILE}: {where}: group_size {spec.group_size} does not divide {cols}")
    groups = {"tensor": 1, "channel": rows, "group": rows * cols // (spec.group_size or 1)}[spec.granularity]
    sparsity = entry.get("sparsity")
    if sparsity == "bitmask":
        kept_count = entry_count(entry, "kept", where, numel)
        kept = unpack_mask(reader.take(w + "_bitmask", torch.uint8, (-(-numel // 8),)), (numel,))
        if int(kept.sum()) != kept_count:
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {w + '_bitmask'!r} does not match 'kept'")
        if not packed:
            values = reader.take(w, torch.int8, (kept_count,))
        else:
            values = unpack_codes(
                reader.take(w + "_packed", torch.int32, (packed_words(kept_count, bits),)), bits, kept_count
            )
    elif sparsity == "dense":
        kept = values = None
        if not packed:
            codes = reader.take(w, torch.int8, shape).reshape(rows, cols)
        else:
            codes = unpack_codes(reader.take(w + "_packed", torch.int32, (rows, packed_words(cols, bits))), bits, cols)
    else:
        raise PackedFormatError(f"{METADATA_FILE}: {where} has unknown sparsity {_short(sparsity)}")
    if packed:
        stored_shape = reader.take(w + "_shape", torch.int64, (len(shape),))
        if tuple(stored_shape.tolist()) != shape:
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {w + '_shape'!r} disagrees with the metadata")
    scale_shape = (1,) if spec.granularity == "tensor" else (rows, groups // rows)
    scale = reader.take(w + "_scale", _DTYPES[spec.scale_dtype], scale_shape).float()
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {w + '_scale'!r} holds non-positive or non-finite scales")
    if spec.symmetric:
        zero_point = torch.zeros(scale_shape, dtype=torch.int32)
    elif packed and spec.granularity != "tensor":
        packed_zp = reader.take(w + "_zero_point", torch.int32, (packed_words(rows, bits), scale_shape[1]))
        zero_point = unpack_codes(packed_zp.t().contiguous(), bits, rows).t().contiguous().to(torch.int32)
    else:
        zero_point = reader.take(w + "_zero_point", torch.int8, scale_shape).to(torch.int32)
    if ((zero_point < spec.qmin) | (zero_point > spec.qmax)).any():
        raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {w + '_zero_point'!r} is off the {bits}-bit grid")
    if kept is not None:
        width = numel // groups
        codes = zero_point.reshape(-1, 1).expand(groups, width).reshape(-1).to(torch.int8).clone()
        codes[kept] = values
        codes = codes.reshape(rows, cols)
    activations = entry.get("activations")
    input_qparams = None
    if activations == "int8_static":
        input_qparams = (
            reader.take(p + "input_scale", torch.float32, (1,)),
            reader.take(p + "input_zero_point", torch.int8, (1,)).to(torch.int32),
        )
        if not torch.isfinite(input_qparams[0]).all() or (input_qparams[0] <= 0).any():
            raise PackedFormatError(
                f"{WEIGHTS_FILE}: tensor {p + 'input_scale'!r} (the static activation scale) is"
                f" {input_qparams[0].item()}, not a finite positive number; the file was edited or corrupted"
            )
    elif activations not in (None, "int8_dynamic"):
        raise PackedFormatError(f"{METADATA_FILE}: {where} has unknown activations {_short(activations)}")
    weight = QuantizedWeight(
        codes=codes,
        scale=scale.reshape(1, 1) if spec.granularity == "tensor" else scale,
        zero_point=zero_point.reshape(1, 1) if spec.granularity == "tensor" else zero_point,
        spec=spec,
        shape=shape,
        dtype=dtype,
    )
    return PackedLayer(weight, str(entry.get("module")), activations, input_qparams, param)


def decode_tensor(key: str, entry: Mapping, reader: _Reader) -> Tensor:
    where = f"tensor {key!r}"
    shape = entry_shape(entry, where, reader.max_numel)
    dtype = entry_dtype(entry, where)
    sparsity, infinite = entry.get("sparsity"), entry.get("infinite") is True
    if sparsity == "dense":
        return _finite(key, reader.take(key, dtype, shape), infinite)
    if sparsity != "bitmask":
        raise PackedFormatError(f"{METADATA_FILE}: {where} has unknown sparsity {_short(sparsity)}")
    numel = math.prod(shape)
    kept_count = entry_count(entry, "kept", where, numel)
    kept = unpack_mask(reader.take(key + "_bitmask", torch.uint8, (-(-numel // 8),)), (numel,))
    if int(kept.sum()) != kept_count:
        raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key + '_bitmask'!r} does not match 'kept'")
    values = _finite(key + "_values", reader.take(key + "_values", dtype, (kept_count,)), infinite)
    dense = torch.zeros(numel, dtype=dtype)
    dense[kept] = values
    return dense.reshape(shape)


# ---------------------------------------------------------------------- files
def _canonical(body: Mapping) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def metadata_bytes(body: Dict[str, Any]) -> bytes:
    """``compression.json``: ``body`` plus a checksum of itself (any edit is detected)."""
    body = {k: v for k, v in body.items() if k != "metadata_sha256"}
    body["metadata_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps(body, indent=2, sort_keys=True).encode()


def read_metadata(directory: Path) -> Dict[str, Any]:
    """Parse and verify ``compression.json`` (checksum and format version)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise PackedFormatError(f"{path}: no such file; is {directory} a lightning-compress export?")
    data = read_packed_file(path)  # (a PackedFormatError is a ValueError: read outside the try)
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PackedFormatError(f"{path}: not valid JSON ({err.__class__.__name__}); the file is corrupted") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise PackedFormatError(f"{path}: not a lightning-compress packed model (format {FORMAT_NAME!r} expected)")
    version = body.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise PackedFormatError(
            f"{path}: format_version {version!r} is not one this reader knows (1 to {FORMAT_VERSION});"
            " upgrade lightning-compress to read it"
        )
    claimed = body.pop("metadata_sha256", None)
    if claimed != hashlib.sha256(_canonical(body)).hexdigest():
        raise PackedFormatError(f"{path}: checksum mismatch; the metadata was edited or corrupted")
    if "weights_sha256" not in body:
        raise PackedFormatError(
            f"{path}: no checksum recorded for {WEIGHTS_FILE} ('weights_sha256' is missing), so its bytes cannot be"
            " verified; export the model again with this version of lightning-compress"
        )
    for key, kind in (("layers", dict), ("tensors", dict), ("aliases", dict), ("weights_sha256", str)):
        if not isinstance(body.get(key), kind):
            raise PackedFormatError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    return body


def read_packed(directory: str | os.PathLike) -> PackedModel:
    """Read and verify a packed directory; every problem raises :class:`PackedFormatError`."""
    from lightning_compress.core.atomic import recover_directory
    directory = Path(directory)
    if not directory.is_dir() and not recover_directory(directory):  # puts back what a killed export moved
        raise PackedFormatError(f"{directory}: no such directory")
    metadata = read_metadata(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise PackedFormatError(f"{weights_path}: no such file")
    data = read_packed_file(weights_path)
    if hashlib.sha256(data).hexdigest() != metadata["weights_sha256"]:
        raise PackedFormatError(f"{weights_path}: checksum mismatch; the file is truncated or corrupted")
    return decode_packed(metadata, data, weights_path)


def decode_packed(metadata: Dict[str, Any], data: bytes, weights_path: str | os.PathLike) -> PackedModel:
    """``model.safetensors`` bytes decoded as the (checked) ``metadata`` says; errors name ``weights_path``."""
    from safetensors.torch import load as load_safetensors
    try:
        reader = _Reader(load_safetensors(data), max_numel=8 * len(data))
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise PackedFormatError(f"{weights_path}: unreadable safetensors file ({err})") from None
    layers, tensors = {}, {}
    for kind, decode, decoded in (("layer", decode_layer, layers), ("tensor", decode_tensor, tensors)):
        for name, entry in metadata[kind + "s"].items():
            if not isinstance(entry, dict):
                raise PackedFormatError(f"{METADATA_FILE}: {kind} {name!r} entry is not an object")
            decoded[name] = decode(name, entry, reader)
    for alias, source in metadata["aliases"].items():
        if not isinstance(source, str) or source not in tensors or source in metadata["aliases"]:
            raise PackedFormatError(f"{METADATA_FILE}: alias {alias!r} points at unknown tensor {_short(source)}")
        if alias in tensors or alias in (parameter_key(name, layer.param) for name, layer in layers.items()):
            raise PackedFormatError(f"{METADATA_FILE}: alias {alias!r} would replace a stored tensor")
        tensors[alias] = tensors[source]
    if reader.tensors:
        raise PackedFormatError(f"{weights_path}: unexpected tensors {sorted(reader.tensors)[:5]}")
    return PackedModel(layers, tensors, metadata)
