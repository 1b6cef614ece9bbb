"""safetensors files written and read one tensor at a time.

``safetensors.torch.save`` needs every tensor in memory at once, and ``load`` (or
``safe_open``, which maps the file: every page it touches counts as resident memory
while the map is open) reads them all. The export and the loader hold one layer at a
time instead:

- :class:`SafetensorsWriter` appends each tensor's bytes to a staging file per element
  size as it comes, then writes the file: the header, then the staged bytes copied in
  chunks, 8-byte elements first, so every tensor starts at a multiple of its element size
  (what ``safetensors.torch.save`` ensures by sorting) and a reader may view it in place.
  The SHA-256 of the file is computed on the way.
- :class:`SafetensorsReader` parses and checks the header (as the ``safetensors`` library
  does: known dtypes, sizes that match the shapes, tensors back to back over the whole
  data) and reads one tensor with a plain ``read`` into a new tensor, never ``mmap``.

The files are ordinary safetensors files: ``safetensors``, ``transformers`` and vLLM read
them. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_compress.core.filesystem import fsync_file
from lightning_compress.formats.errors import PackedFormatError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_CHUNK = 1 << 20


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (CPU, contiguous), without a copy."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """One safetensors file, built a tensor at a time.

    Args:
        staging: folder for the staging files (removed by :meth:`write`); ``None`` stages
            in memory (a dry export).
    """

    def __init__(self, staging: Optional[Path] = None) -> None:
        self._staging = staging
        self._sinks: Dict[int, BinaryIO] = {}
        self._entries: List[Tuple[str, str, List[int], int, int]] = []  # name, dtype, shape, itemsize, bytes
        self._names: set = set()

    def add(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor`` under ``name`` (its bytes go to staging now)."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        if tensor.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: safetensors has no dtype {tensor.dtype}")
        tensor = tensor.detach().cpu().contiguous()
        data = tensor_bytes(tensor)
        size = tensor.element_size()
        sink = self._sinks.get(size)
        if sink is None:
            sink = self._sinks[size] = (io.BytesIO() if self._staging is None
                                        else open(self._staging / f".staging-{size}", "w+b"))
        sink.write(data)
        self._names.add(name)
        self._entries.append((name, _NAMES[tensor.dtype], list(tensor.shape), size, len(data)))

    def header(self) -> bytes:
        """The length-prefixed JSON header, padded with spaces to a multiple of 8 bytes."""
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, _, nbytes in self._ordered():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        return struct.pack("<Q", len(text)) + text

    def _ordered(self):
        # Larger elements first, each size in the order added: the order the staging files hold.
        return sorted(self._entries, key=lambda entry: -entry[3])

    def write(self, out: BinaryIO) -> Tuple[str, int]:
        """Write the file to ``out``; returns its SHA-256 (hex) and size. The staging is
        released (its files deleted)."""
        digest = hashlib.sha256()
        size = 0
        try:
            header = self.header()
            digest.update(header)
            out.write(header)
            size += len(header)
            for element_size in sorted(self._sinks, reverse=True):
                sink = self._sinks[element_size]
                sink.seek(0)
                while True:
                    chunk = sink.read(_CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        finally:
            self.close()
        return digest.hexdigest(), size

    def write_file(self, path: Path) -> Tuple[str, int]:
        """:meth:`write` to a new file at ``path``, fsynced."""
        with open(path, "xb") as out:
            result = self.write(out)
        fsync_file(path)
        return result

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        self.write(out)
        return out.getvalue()

    def close(self) -> None:
        """Drop the staging (files included)."""
        for size, sink in self._sinks.items():
            sink.close()
            if self._staging is not None:
                (self._staging / f".staging-{size}").unlink(missing_ok=True)
        self._sinks = {}


class SafetensorsReader:
    """The tensors of a safetensors file (``source``: its path, or its bytes), read one at
    a time. ``label`` names the file in errors.

    Raises:
        PackedFormatError: the file is not a well-formed safetensors file (the message
            says what is wrong), or cannot be read.
    """

    def __init__(self, source: Union[Path, bytes], label: str) -> None:
        self.source, self.label = source, label
        try:
            self.size = len(source) if isinstance(source, (bytes, bytearray)) else os.path.getsize(source)
            self.entries, self.start = self._parse()
        except OSError as error:
            raise PackedFormatError(f"{label}: cannot be read ({error.strerror or error})") from None

    def _bad(self, why: str) -> PackedFormatError:
        return PackedFormatError(f"{self.label}: unreadable safetensors file ({why})")

    def _read(self, offset: int, count: int, into: Optional[memoryview] = None) -> bytes:
        if isinstance(self.source, (bytes, bytearray)):
            data = self.source[offset: offset + count]
            if into is not None:
                into[:] = data
            return data
        with open(self.source, "rb", buffering=0) as handle:
            handle.seek(offset)
            if into is None:
                return handle.read(count)
            done = 0
            while done < count:
                got = handle.readinto(into[done:])
                if not got:
                    raise self._bad("the file ends inside a tensor")
                done += got
            return b""

    def _parse(self) -> Tuple[Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]], int]:
        if self.size < 8:
            raise self._bad("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", self._read(0, 8))
        if length > min(self.size - 8, MAX_HEADER_BYTES):
            raise self._bad(f"header length {length} is beyond the file")
        try:
            header = json.loads(self._read(8, length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise self._bad(f"header is not JSON: {type(err).__name__}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        entries, spans = {}, []
        for name, info in header.items():
            if name == "__metadata__":
                if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                    raise self._bad("__metadata__ is not a map of strings")
                continue
            entries[name] = self._entry(name, info)
            spans.append((entries[name][2], entries[name][3], name))
        end = 0
        for begin, stop, name in sorted(spans):
            if begin != end:
                raise self._bad(f"tensor {name!r} does not start where the one before it ends")
            end = stop
        if end != self.size - 8 - length:
            raise self._bad(f"tensors cover {end} bytes, the file holds {self.size - 8 - length}")
        return entries, 8 + length

    def _entry(self, name: str, info: object):
        fields = info if isinstance(info, dict) else {}
        dtype = DTYPES.get(fields.get("dtype")) if isinstance(fields.get("dtype"), str) else None
        shape, offsets = fields.get("shape"), fields.get("data_offsets")
        if dtype is None or not _ints(shape) or not (_ints(offsets) and len(offsets) == 2):
            raise self._bad(f"tensor {name!r} has a bad dtype, shape or data_offsets")
        begin, stop = offsets
        if stop < begin or math.prod(shape) * dtype.itemsize != stop - begin:
            raise self._bad(f"tensor {name!r}: data_offsets {offsets} do not hold a {shape} {fields['dtype']} tensor")
        return dtype, tuple(shape), begin, stop

    def names(self) -> List[str]:
        return list(self.entries)

    def info(self, name: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        """``(dtype, shape)`` of ``name`` from the header (``KeyError`` if absent)."""
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def read(self, name: str) -> Tensor:
        """A new tensor holding ``name``'s values (nothing shared with the file)."""
        dtype, shape, begin, stop = self.entries[name]
        raw = torch.empty(stop - begin, dtype=torch.uint8)
        if stop > begin:
            self._read(self.start + begin, stop - begin, memoryview(raw.numpy()))
        if dtype == torch.bool:
            return raw.view(torch.bool).reshape(shape)
        return raw.view(dtype).reshape(shape)


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of the file at ``path``, read in chunks (nothing resident but a chunk)."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                return digest.hexdigest()
            digest.update(view[:count])


__all__ = ["DTYPES", "SafetensorsReader", "SafetensorsWriter", "file_sha256", "tensor_bytes"]
