"""Checksums of the files an export writes beside ``model.safetensors``.

``compression.json`` records the SHA-256 of ``model.safetensors`` (``weights_sha256``,
checked by every load) and, under ``files_sha256``, of each companion file the export
wrote and checked: ``config.json`` (transformers), ``model.onnx`` (and its external data
file, over 2 GiB) and ``model.gguf``. Those files are read by other engines, which know
nothing of the record, so they are checked by ``lightning-compress inspect --verify``
(:func:`~lightning_compress.formats.inspection.verify_packed`): a flipped byte or a
truncated copy of ``model.onnx`` is found before onnxruntime runs it.

Only these names are recorded or read: the metadata is data, and a name in it is never
a path to open (see :func:`verify_companions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from lightning_compress.formats.errors import PackedFormatError
from lightning_compress.formats.gguf import GGUF_FILE
from lightning_compress.formats.packing import CONFIG_FILE
from lightning_compress.formats.safetensors_stream import file_sha256

ONNX_FILE = "model.onnx"
REPORT_FILE = "report.txt"  # the export's per-layer table, as text
COMPANION_FILES = (CONFIG_FILE, ONNX_FILE, ONNX_FILE + ".data", GGUF_FILE)
RECORD_KEY = "files_sha256"


def companion_checksums(directory: Path) -> Dict[str, str]:
    """The SHA-256 of each companion file present in ``directory``, by name."""
    return {name: file_sha256(directory / name) for name in COMPANION_FILES if (directory / name).is_file()}


def verify_companions(directory: Path, metadata: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """Check each companion file recorded in ``metadata`` against its SHA-256; returns the
    names checked, and those present with no SHA-256 recorded (an export written before the
    record existed, or a ``.failed-parity`` folder, whose files were never checked whole).

    Raises:
        PackedFormatError: a recorded file is missing, or its bytes differ from the record,
            or the record is malformed or names a file no export writes.
    """
    recorded = metadata.get(RECORD_KEY, {})
    if not isinstance(recorded, Mapping) or not all(isinstance(v, str) for v in recorded.values()):
        raise PackedFormatError(f"{directory}: {RECORD_KEY!r} in compression.json is not a mapping of names to checksums")
    unknown = sorted(set(recorded) - set(COMPANION_FILES))
    if unknown:
        raise PackedFormatError(
            f"{directory}: compression.json records checksums for {unknown}, which no export writes"
            f" (only {list(COMPANION_FILES)}); the metadata was not written by lightning-compress"
        )
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file():
            raise PackedFormatError(f"{path}: missing; the export wrote it and recorded its SHA-256")
        if file_sha256(path) != digest:
            raise PackedFormatError(
                f"{path}: checksum mismatch with the SHA-256 recorded in compression.json; the file is truncated,"
                " corrupted or was replaced after the export checked it"
            )
    unchecked = [name for name in COMPANION_FILES if name not in recorded and (directory / name).is_file()]
    return sorted(recorded), unchecked


__all__ = ["COMPANION_FILES", "ONNX_FILE", "RECORD_KEY", "companion_checksums", "verify_companions"]
