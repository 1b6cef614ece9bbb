"""The packed-model directory: ``model.safetensors`` + ``compression.json``, no pickle.

Tensor names follow compressed-tensors for every quantized layer (Linear layers load in
``transformers``; Embedding is stored in its names but does not load there; Conv uses the
same names as our documented extension). For a
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
refuses any byte that changed, so corruption cannot give a silently wrong model. The
files written for other engines have theirs too (:mod:`~lightning_compress.formats.companions`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from reprlib import repr as _short
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor

from lightning_compress.core.targeting import is_recurrent_weight, parameter_key
from lightning_compress.formats.blocks import WordsWeight, finite, unpack_rows
from lightning_compress.formats.decoded import DecodedEntries
from lightning_compress.formats.errors import ExportError, PackedFormatError, read_packed_file
from lightning_compress.formats.safetensors_stream import SafetensorsReader, file_sha256
from lightning_compress.quant.fake_quant import QuantizedWeight
from lightning_compress.quant.packing import packed_words
from lightning_compress.quant.spec import QuantSpec
from lightning_compress.sparsity.masks import unpack_mask

FORMAT_NAME = "lightning-compress/packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
LAYER_PARAMS = ("weight", "in_proj_weight")  # the parameters a packed layer may hold
METADATA_FILE = "compression.json"

DTYPES = {
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
    if dtype in DTYPES.values():
        return next(name for name, value in DTYPES.items() if value == dtype)
    raise ExportError(f"cannot store a tensor of dtype {dtype}; supported: {sorted(DTYPES)}")


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

    @property
    def float32_bytes(self) -> int:
        """The weight's size in float32: what a pass over the layer makes and frees (see
        :class:`~lightning_compress.core.memory.ReleasePacer`)."""
        return 4 * math.prod(self.weight.shape)


@dataclass
class LayerGrid:
    """What the metadata says of a quantized weight, no tensor read: a
    :class:`PackedLayer`'s ``weight`` where only the grid is asked for (which kernel a
    layer may run, which compressed-tensors scheme it gets)."""

    spec: QuantSpec
    shape: tuple
    dtype: torch.dtype


# ---------------------------------------------------------------------- decode
class TensorReader:
    """Reads tensors of a safetensors file one at a time, checking names, dtypes and shapes
    against the header before reading. ``max_numel`` bounds what a metadata shape may
    claim: no valid entry stores fewer than one bit per element, so nothing larger fits in
    a file of that many bytes / 8."""

    def __init__(self, file: SafetensorsReader) -> None:
        self.file = file
        self.max_numel = 8 * file.size
        self.taken: set = set()

    def take(self, key: str, dtype: torch.dtype, shape: Optional[tuple] = None) -> Tensor:
        if key not in self.file.entries:
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key!r} is missing")
        stored, stored_shape = self.file.info(key)
        if stored != dtype:
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key!r} is {stored}, expected {dtype}")
        if shape is not None and stored_shape != tuple(shape):
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key!r} has shape {stored_shape}, expected {tuple(shape)}")
        self.taken.add(key)
        return self.file.read(key)

    def unexpected(self) -> List[str]:
        """Tensors of the file that no entry has taken (so far)."""
        return sorted(set(self.file.entries) - self.taken)


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
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None or floating and not dtype.is_floating_point:
        allowed = sorted(n for n, d in DTYPES.items() if d.is_floating_point or not floating)
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
    if not finite(tensor, allow_infinite=infinite):
        raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {key!r} holds NaN or Inf values, which the export never"
                                " writes; the file was edited or corrupted: export the model again")
    return tensor


def layer_grid(name: str, entry: Mapping, max_numel: int) -> PackedLayer:
    """The layer ``name`` as its metadata ``entry`` describes it, checked, no tensor read:
    a :class:`PackedLayer` whose ``weight`` is a :class:`LayerGrid`."""
    where = f"layer {name!r}"
    if not isinstance(entry, dict):
        raise PackedFormatError(f"{METADATA_FILE}: {where} entry is not an object")
    fields = {key: _field(entry, key, kind, where)
              for key, kind in (("bits", int), ("granularity", str), ("symmetric", bool), ("scale_dtype", str))}
    try:
        spec = QuantSpec(group_size=entry.get("group_size"), **fields)
    except ValueError as err:
        raise PackedFormatError(f"{METADATA_FILE}: {where}: {err}") from None
    shape = entry_shape(entry, where, max_numel, positive=True)
    dtype = entry_dtype(entry, where, floating=True)
    param = entry.get("param", "weight")
    recurrent = isinstance(param, str) and is_recurrent_weight(param) and name.rpartition(".")[2] == param
    if param not in LAYER_PARAMS and not recurrent:
        raise PackedFormatError(f"{METADATA_FILE}: {where} has unknown param {_short(param)};"
                                f" expected one of {list(LAYER_PARAMS)} or a recurrent layer's weight_ih_l<k>...")
    activations = entry.get("activations")
    if activations not in (None, "int8_dynamic", "int8_static"):
        raise PackedFormatError(f"{METADATA_FILE}: {where} has unknown activations {_short(activations)}")
    return PackedLayer(LayerGrid(spec, shape, dtype), str(entry.get("module")), activations, None, param)


def decode_layer(name: str, entry: Mapping, reader: TensorReader) -> PackedLayer:
    where = f"layer {name!r}"
    grid = layer_grid(name, entry, reader.max_numel)
    spec, shape, dtype, param, activations = (grid.weight.spec, grid.weight.shape, grid.weight.dtype, grid.param,
                                              grid.activations)
    rows, cols = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
    numel, p, bits = rows * cols, (f"{name}." if name else ""), spec.bits
    w = parameter_key(name, param)
    packed = bits < 8 or entry.get("packing") == "int32-dense"  # 8-bit codes packed into int32 words too
    if spec.granularity == "group" and cols % spec.group_size:
        raise PackedFormatError(f"{METADATA_FILE}: {where}: group_size {spec.group_size} does not divide {cols}")
    groups = {"tensor": 1, "channel": rows, "group": rows * cols // (spec.group_size or 1)}[spec.granularity]
    sparsity = entry.get("sparsity")
    if sparsity == "bitmask":
        kept_count = entry_count(entry, "kept", where, numel)
        kept = unpack_mask(reader.take(w + "_bitmask", torch.uint8, (-(-numel // 8),)), (numel,))
        if int(torch.count_nonzero(kept)) != kept_count:
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {w + '_bitmask'!r} does not match 'kept'")
        if not packed:
            values = reader.take(w, torch.int8, (kept_count,))
        else:
            values = unpack_rows(
                reader.take(w + "_packed", torch.int32, (packed_words(kept_count, bits),)), bits, kept_count
            )
    elif sparsity == "dense":
        kept = values = words = None
        if not packed:
            codes = reader.take(w, torch.int8, shape).reshape(rows, cols)
        elif bits < 8:  # kept packed: see WordsWeight
            words = reader.take(w + "_packed", torch.int32, (rows, packed_words(cols, bits)))
        else:
            codes = unpack_rows(reader.take(w + "_packed", torch.int32, (rows, packed_words(cols, bits))), bits, cols)
    else:
        raise PackedFormatError(f"{METADATA_FILE}: {where} has unknown sparsity {_short(sparsity)}")
    if packed:
        stored_shape = reader.take(w + "_shape", torch.int64, (len(shape),))
        if tuple(stored_shape.tolist()) != shape:
            raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {w + '_shape'!r} disagrees with the metadata")
    scale_shape = (1,) if spec.granularity == "tensor" else (rows, groups // rows)
    scale = reader.take(w + "_scale", DTYPES[spec.scale_dtype], scale_shape).float()
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {w + '_scale'!r} holds non-positive or non-finite scales")
    if spec.symmetric:
        zero_point = torch.zeros(scale_shape, dtype=torch.int32)
    elif packed and spec.granularity != "tensor":
        packed_zp = reader.take(w + "_zero_point", torch.int32, (packed_words(rows, bits), scale_shape[1]))
        zero_point = unpack_rows(packed_zp.t().contiguous(), bits, rows).t().contiguous().to(torch.int32)
    else:
        zero_point = reader.take(w + "_zero_point", torch.int8, scale_shape).to(torch.int32)
    if ((zero_point < spec.qmin) | (zero_point > spec.qmax)).any():
        raise PackedFormatError(f"{WEIGHTS_FILE}: tensor {w + '_zero_point'!r} is off the {bits}-bit grid")
    if kept is not None:
        width = numel // groups
        codes = zero_point.reshape(-1, 1).to(torch.int8).expand(groups, width).reshape(-1).clone()
        codes[kept] = values
        codes = codes.reshape(rows, cols)
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
    grid_fields = dict(scale=scale.reshape(1, 1) if spec.granularity == "tensor" else scale,
                       zero_point=zero_point.reshape(1, 1) if spec.granularity == "tensor" else zero_point,
                       spec=spec, shape=shape, dtype=dtype)
    weight = (QuantizedWeight(codes=codes, **grid_fields) if sparsity != "dense" or words is None
              else WordsWeight(words, cols, **grid_fields))
    return PackedLayer(weight, grid.module, activations, input_qparams, param)


def decode_tensor(key: str, entry: Mapping, reader: TensorReader) -> Tensor:
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
    if int(torch.count_nonzero(kept)) != kept_count:
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


# ---------------------------------------------------------------------- the model
class PackedModel:
    """What a packed directory holds: quantized layers by weight key (``layers``), every
    other state-dict tensor by key, sparse ones made dense again, aliases included
    (``tensors``), and the metadata. Tensors are read from ``model.safetensors`` when asked
    for (see :class:`~lightning_compress.formats.decoded.DecodedEntries`), so the model is never in memory twice; ``layer(key)`` and
    ``tensor(key)`` read one without keeping it.

    Raises:
        PackedFormatError: an entry or an alias of the metadata is malformed.
    """

    def __init__(self, metadata: Dict[str, Any], reader: TensorReader) -> None:
        self.metadata, self.reader = metadata, reader
        entries = metadata["layers"]
        bad = next((key for key, entry in metadata["tensors"].items() if not isinstance(entry, dict)), None)
        if bad is not None:
            raise PackedFormatError(f"{METADATA_FILE}: tensor {bad!r} entry is not an object")
        self.grids = {key: layer_grid(key, entry, reader.max_numel) for key, entry in entries.items()}
        stored = {parameter_key(key, grid.param) for key, grid in self.grids.items()}
        aliases = metadata["aliases"]
        for alias, source in aliases.items():
            if not isinstance(source, str) or source not in metadata["tensors"] or source in aliases:
                raise PackedFormatError(f"{METADATA_FILE}: alias {alias!r} points at unknown tensor {_short(source)}")
            if alias in metadata["tensors"] or alias in stored:
                raise PackedFormatError(f"{METADATA_FILE}: alias {alias!r} would replace a stored tensor")
        self.layers = DecodedEntries(list(entries), lambda key: decode_layer(key, entries[key], reader), {})
        self.tensors = DecodedEntries([*metadata["tensors"], *aliases],
                                lambda key: decode_tensor(key, metadata["tensors"][key], reader), aliases)

    def layer(self, key: str) -> PackedLayer:
        return self.layers.fresh(key)

    def tensor(self, key: str) -> Tensor:
        return self.tensors.fresh(key)

    def validate(self) -> "PackedModel":
        """Decode every entry once (one at a time) and refuse tensors no entry names."""
        for mapping in (self.layers, self.tensors):
            for _ in mapping.values():
                pass
        self.check_complete()
        return self

    def check_complete(self) -> None:
        """Refuse tensors of the file that no entry read (after a pass over all of them)."""
        unexpected = self.reader.unexpected()
        if unexpected:
            raise PackedFormatError(f"{self.reader.file.label}: unexpected tensors {unexpected[:5]}")


def open_packed(directory: Union[str, os.PathLike]) -> PackedModel:
    """Open a packed directory: ``compression.json`` and the header of
    ``model.safetensors`` read and checked, the weights' SHA-256 verified (read in chunks);
    tensors are read when asked for. Every problem raises :class:`PackedFormatError`."""
    from lightning_compress.core.atomic import recover_directory
    from lightning_compress.core.filesystem import user_path
    directory = user_path(directory, "directory")
    if not directory.is_dir() and not recover_directory(directory):  # puts back what a killed export moved
        raise PackedFormatError(f"{directory}: no such directory")
    metadata = read_metadata(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise PackedFormatError(f"{weights_path}: no such file")
    try:
        digest = file_sha256(weights_path)
    except OSError as error:
        raise PackedFormatError(f"{weights_path}: cannot be read ({error.strerror or error})") from None
    if digest != metadata["weights_sha256"]:
        raise PackedFormatError(f"{weights_path}: checksum mismatch; the file is truncated or corrupted")
    return PackedModel(metadata, TensorReader(SafetensorsReader(weights_path, str(weights_path))))


def read_packed(directory: Union[str, os.PathLike]) -> PackedModel:
    """:func:`open_packed`, then every tensor decoded once and checked (one at a time)."""
    return open_packed(directory).validate()


def decode_packed(metadata: Dict[str, Any], data: bytes, weights_path: Union[str, os.PathLike]) -> PackedModel:
    """``model.safetensors`` bytes decoded as the (checked) ``metadata`` says; errors name ``weights_path``."""
    return PackedModel(metadata, TensorReader(SafetensorsReader(data, str(weights_path)))).validate()
