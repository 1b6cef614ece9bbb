"""Per-layer summaries of a packed directory or a training checkpoint (``lightning-compress inspect``)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

from lightning_compress.core.reporting import format_table
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE, dtype_bits, read_metadata

COLUMNS = ["layer", "params", "bits", "sparsity", "bytes"]


def inspect_path(path: Union[str, os.PathLike]) -> str:
    """The per-layer table and totals of a packed directory or a Lightning checkpoint."""
    path = Path(path)
    if path.is_dir():
        return inspect_packed(path)
    if path.is_file():
        return inspect_checkpoint(path)
    raise FileNotFoundError(f"{str(path)!r} is neither a packed directory nor a checkpoint file")


def inspect_packed(directory: Path) -> str:
    """Rows from ``compression.json``: what each layer is stored as and how many bytes."""
    metadata = read_metadata(directory)  # verifies the checksum and the format version
    rows = []
    for name, entry in metadata["layers"].items():
        params = math.prod(entry["shape"])
        rows.append([name, params, entry["bits"], 1.0 - entry["kept"] / params, entry["bytes"]])
    for name, entry in metadata["tensors"].items():
        params = math.prod(entry["shape"])
        bits = dtype_bits(entry["dtype"])
        kept = entry.get("kept", params)
        stored = (math.ceil(params / 8) + kept * bits // 8) if entry["sparsity"] == "bitmask" else params * bits // 8
        rows.append([name, params, bits, 1.0 - kept / max(params, 1), stored])
    file_bytes = (directory / WEIGHTS_FILE).stat().st_size
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
    return "\n".join(lines)


def inspect_checkpoint(path: Path) -> str:
    """Rows from a Lightning checkpoint: weights, their zeros, and the QAT bits per layer."""
    from lightning_compress.core.state import recipe_in_checkpoint
    from lightning_compress.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(path)
    bits = _qat_bits(checkpoint.get("callbacks", {}))
    rows = []
    for key, tensor in checkpoint["state_dict"].items():
        if not hasattr(tensor, "numel") or tensor.numel() == 0:
            continue
        layer = key.rsplit(".", 1)[0]
        layer_bits = bits.get(layer, tensor.element_size() * 8) if key.endswith("weight") else tensor.element_size() * 8
        zeros = int((tensor == 0).sum()) if tensor.is_floating_point() else 0
        rows.append([key, tensor.numel(), layer_bits, zeros / tensor.numel(), tensor.numel() * tensor.element_size()])
    lines = [
        format_table(f"checkpoint {path}", COLUMNS, rows + [_total(rows)]),
        f"epoch {checkpoint.get('epoch')}, global step {checkpoint.get('global_step')};"
        f" callbacks with state: {sorted(checkpoint.get('callbacks', {}))}",
    ]
    recipe = recipe_in_checkpoint(checkpoint)
    if recipe is not None:
        lines.append(f"recipe: {recipe}")
    return "\n".join(lines)


def _qat_bits(states: Mapping[str, Any]) -> Dict[str, int]:
    """Layer name -> weight bits, from any QuantizationAwareTraining state in the checkpoint."""
    bits = {}
    for key, state in states.items():
        if key.startswith("QuantizationAwareTraining") and isinstance(state, Mapping):
            for layer, entry in state.get("layers", {}).items():
                match = re.match(r"int(\d+)", str(entry.get("spec", ""))) if isinstance(entry, Mapping) else None
                if match:
                    bits[layer] = int(match.group(1))
    return bits


def _total(rows: List[List[Any]]) -> List[Any]:
    params = sum(row[1] for row in rows)
    zeros = sum(row[1] * row[3] for row in rows)
    return ["total", params, "", zeros / max(params, 1), sum(row[4] for row in rows)]
