"""Per-layer summaries of a packed directory or a training checkpoint (``lightning-compress inspect``)."""

from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

import torch

from lightning_compress.core.filesystem import distributed_checkpoint_problem, user_path
from lightning_compress.core.reporting import format_table
from lightning_compress.formats.companions import verify_companions
from lightning_compress.formats.errors import PackedFormatError
from lightning_compress.formats.failed_export import recorded_failure, refusal
from lightning_compress.formats.packed import (
    METADATA_FILE,
    WEIGHTS_FILE,
    entry_count,
    entry_dtype,
    entry_shape,
    read_metadata,
    read_packed,
)

COLUMNS = ["layer", "params", "bits", "sparsity", "bytes"]


def inspect_path(path: Union[str, os.PathLike]) -> str:
    """The per-layer table and totals of a packed directory or a Lightning checkpoint."""
    path = user_path(path, "path")
    if path.is_dir():
        problem = distributed_checkpoint_problem(path)
        if problem is not None:
            raise PackedFormatError(problem)
        return inspect_packed(path)
    if path.is_file():
        return inspect_checkpoint(path)
    raise FileNotFoundError(f"{str(path)!r} is neither a packed directory nor a checkpoint file")


def verify_path(path: Union[str, os.PathLike]) -> str:
    """:func:`verify_packed` for a packed directory; a checkpoint records no checksum to check.

    Raises:
        PackedFormatError: the directory fails verification.
        ValueError: ``path`` is a checkpoint file, not a packed directory.
    """
    path = user_path(path, "path")
    if path.is_file():
        raise ValueError(
            f"{str(path)!r} is a checkpoint file: no checksum recorded in it to verify against; --verify checks"
            " a packed directory written by `lightning-compress export`"
        )
    return verify_packed(path)


def verify_packed(directory: Union[str, os.PathLike]) -> str:
    """Read ``model.safetensors`` whole, check it against the SHA-256 recorded in
    ``compression.json`` and decode every tensor (names, dtypes, shapes, grids, finite
    values), as :func:`~lightning_compress.load_packed` does before it builds a model;
    then check the files written for other engines (``model.onnx``, ``model.gguf``,
    ``config.json``) against theirs (:mod:`~lightning_compress.formats.companions`).
    Returns a one-line summary.

    Raises:
        PackedFormatError: a missing, truncated, corrupted or edited file, or an export
            that records no checksum (the message says which file and which tensor).
    """
    packed = read_packed(directory)
    companions, unchecked = verify_companions(Path(directory), packed.metadata)
    size = (Path(directory) / WEIGHTS_FILE).stat().st_size
    verified = (
        f"verified: {WEIGHTS_FILE} ({size:,} bytes)" + "".join(f", {name}" for name in companions)
        + f" {'match their' if companions else 'matches the'} SHA-256 recorded in {METADATA_FILE};"
        f" {len(packed.layers)} quantized layers and {len(packed.tensors)} tensors decode, all values finite"
        + (f"; NOT verified: {', '.join(unchecked)} (no SHA-256 recorded for them: an export older than the"
           " record, or one whose check failed)" if unchecked else "")
    )
    return _with_failure(verified, recorded_failure(packed.metadata), directory)


def inspect_packed(directory: Path) -> str:
    """Rows from ``compression.json``: what each layer is stored as and how many bytes.
    Only the metadata is read (``--verify`` also reads the weights)."""
    metadata = read_metadata(directory)  # verifies the checksum and the format version
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise PackedFormatError(f"{weights}: no such file")
    file_bytes = weights.stat().st_size
    most = 8 * file_bytes  # elements a file of this size can hold (one bit each at least)
    rows = []
    for name, entry in metadata["layers"].items():
        where = f"layer {name!r}"
        entry = _entry(entry, where)
        params = math.prod(entry_shape(entry, where, most, positive=True))
        bits = entry_count(entry, "bits", where, 8)
        rows.append([name, params, bits, 1.0 - entry_count(entry, "kept", where, params) / params,
                     entry_count(entry, "bytes", where, file_bytes)])
    for name, entry in metadata["tensors"].items():
        where = f"tensor {name!r}"
        entry = _entry(entry, where)
        params = math.prod(entry_shape(entry, where, most))
        bits = entry_dtype(entry, where).itemsize * 8
        sparsity = entry.get("sparsity")
        if sparsity not in ("dense", "bitmask"):
            raise PackedFormatError(f"{METADATA_FILE}: {where} has unknown sparsity {reprlib.repr(sparsity)}")
        kept = entry_count(entry, "kept", where, params) if sparsity == "bitmask" else params
        stored = (-(-params // 8) + kept * bits // 8) if sparsity == "bitmask" else params * bits // 8
        rows.append([name, params, bits, 1.0 - kept / max(params, 1), stored])
    params = sum(row[1] for row in rows)
    lines = [
        format_table(f"packed model {directory}", COLUMNS, rows + [_total(rows)]),
        f"{WEIGHTS_FILE}: {file_bytes:,} bytes for {params:,} parameters"
        f" ({8 * file_bytes / max(params, 1):.3f} bits per parameter; float32 would be {4 * params:,} bytes)",
        f"{METADATA_FILE}: format version {metadata['format_version']}; library versions"
        f" {metadata.get('library_versions', {})}",
    ]
    if metadata.get("recipe"):
        lines.append(f"recipe: {metadata['recipe']}")
    return _with_failure("\n".join(lines), recorded_failure(metadata), directory)


def _with_failure(text: str, failure, directory) -> str:
    """``text`` headed by a warning when the export failed its check (a ``.failed-parity`` directory)."""
    return text if failure is None else f"WARNING: {refusal(directory, failure)}\n{text}"


def inspect_checkpoint(path: Path) -> str:
    """Rows from a Lightning checkpoint: weights, their zeros, and the QAT bits per layer."""
    from lightning_compress.core.state import recipe_in_checkpoint
    from lightning_compress.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(path)
    state_dict = checkpoint["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"checkpoint {str(path)!r}: its 'state_dict' is a {type(state_dict).__name__}, not a mapping of names"
            " to tensors; it is not a Lightning checkpoint"
        )
    callbacks = checkpoint.get("callbacks")
    callbacks = callbacks if isinstance(callbacks, Mapping) else {}
    bits = _qat_bits(callbacks)
    rows = []
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            continue
        key = str(key)
        stored = tensor.element_size() * 8
        # QAT keys a layer's `weight` by the layer's name, each matrix of a recurrent layer
        # (`rnn.weight_hh_l0`) by its own
        layer_bits = bits.get(key, bits.get(key.rsplit(".", 1)[0], stored) if key.endswith("weight") else stored)
        zeros = int((tensor == 0).sum()) if tensor.is_floating_point() else 0
        rows.append([key, tensor.numel(), layer_bits, zeros / tensor.numel(), tensor.numel() * tensor.element_size()])
    lines = [
        format_table(f"checkpoint {path}", COLUMNS, rows + [_total(rows)]),
        f"epoch {checkpoint.get('epoch')}, global step {checkpoint.get('global_step')};"
        f" callbacks with state: {sorted(map(str, callbacks))}",
    ]
    recipe = recipe_in_checkpoint(checkpoint)
    if recipe is not None:
        lines.append(f"recipe: {recipe}")
    return "\n".join(lines)


def _qat_bits(states: Mapping[str, Any]) -> Dict[str, int]:
    """Layer name -> weight bits, from any QuantizationAwareTraining state in the checkpoint."""
    bits = {}
    for key, state in states.items():
        layers = state.get("layers") if isinstance(state, Mapping) else None
        if str(key).startswith("QuantizationAwareTraining") and isinstance(layers, Mapping):
            for layer, entry in layers.items():
                match = re.match(r"int(\d+)", str(entry.get("spec", ""))) if isinstance(entry, Mapping) else None
                if match:
                    bits[layer] = int(match.group(1))
    return bits


def _entry(entry: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise PackedFormatError(f"{METADATA_FILE}: {where} entry is not an object")
    return entry


def _total(rows: List[List[Any]]) -> List[Any]:
    params = sum(row[1] for row in rows)
    zeros = sum(row[1] * row[3] for row in rows)
    return ["total", params, "", zeros / max(params, 1), sum(row[4] for row in rows)]
