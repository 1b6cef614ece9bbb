"""Read an offline W&B run directory back, for tests: what a sync would upload.

``run-<id>.wandb`` is a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs:
a 7-byte file header (``:W&B``, magic ``0xBEE1``, version 0), then 32 KiB blocks of
chunks, each with a 7-byte header (CRC-32 of the type byte and the data, little-endian
length, type: 1 full, 2 first, 3 middle, 4 last). A block with fewer than 7 bytes left is
padded. wandb 0.31 writes and reads it in its Go core, so the Python SDK has no reader
of its own; this one checks every CRC.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """The ``Record`` protobufs of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log (header {ident!r} {magic:#x} {version})")
    position, pending = _FILE_HEADER.size, b""
    while position + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:
            position += left_in_block
            continue
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, position)
        if kind == 0 and length == 0:  # zero padding: nothing more was written
            break
        start = position + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) != length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: corrupt chunk at byte {position}")
        position = start + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def finished_records(path: str | Path, timeout: float = 30.0) -> List[Any]:
    """The records of a finished run's ``.wandb`` file.

    ``run.finish()`` can return before wandb's core process has written the file (it
    may hold only the header then), so this waits until the log ends with the run's
    ``exit`` record, re-reading it, for up to ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(iter_records(path))
        except ValueError:  # a chunk being written
            records = []
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no exit record after {timeout} s; was the run finished?")
        time.sleep(0.05)


def read_offline_run(run_dir: str | Path) -> Dict[str, Any]:
    """Everything a test checks in a finished offline run directory (``.../offline-run-*``).

    Returns a dict with:

    - ``history``: one dict per ``run.log`` call, keys as logged (``"pruning/sparsity_actual"``,
      ``"trainer/global_step"``, ``"_step"``, ...); a logged ``wandb.Table`` is a dict with
      ``_type == "table-file"`` and its ``path`` under ``files/``.
    - ``config``: the run config, nested (custom charts sit under ``_wandb.visualize``).
    - ``summary``: the final summary, nested.
    - ``tables``: ``{key: [table JSON, ...]}``, one entry per time the key was logged,
      each the ``files/media/table/*.table.json`` content (``columns`` and ``data``).
    - ``artifacts``: user artifacts, in order: ``{"name", "type", "metadata", "files"}``
      where ``files`` maps each manifest path to its size (W&B's own ``run_table``
      artifacts that carry logged tables are left out).
    """
    run_dir = Path(run_dir)
    (log_file,) = run_dir.glob("run-*.wandb")
    history: List[Dict[str, Any]] = []
    config: Dict[str, Any] = {}
    summary: Dict[str, Any] = {}
    artifacts: List[Dict[str, Any]] = []
    for record in finished_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: Dict[str, Any] = {}
            for item in record.history.item:
                _assign(row, item, json.loads(item.value_json))
            history.append(row)
        elif kind in ("config", "run"):
            for item in (record.config if kind == "config" else record.run.config).update:
                _assign(config, item, json.loads(item.value_json))
        elif kind == "summary":
            for item in record.summary.update:
                _assign(summary, item, json.loads(item.value_json))
        elif kind == "artifact" and record.artifact.type != "run_table":
            artifact = record.artifact
            artifacts.append(
                {
                    "name": artifact.name,
                    "type": artifact.type,
                    "metadata": json.loads(artifact.metadata) if artifact.metadata else {},
                    "files": {entry.path: entry.size for entry in artifact.manifest.contents},
                }
            )
    tables: Dict[str, List[Dict[str, Any]]] = {}
    for row in history:
        for key, value in row.items():
            if isinstance(value, dict) and value.get("_type") == "table-file":
                tables.setdefault(key, []).append(json.loads((run_dir / "files" / value["path"]).read_text()))
    return {"history": history, "config": config, "summary": summary, "tables": tables, "artifacts": artifacts}


def scalar_series(run: Dict[str, Any], key: str) -> Dict[int, float]:
    """``{trainer/global_step: value}`` of a scalar logged through Lightning."""
    return {row["trainer/global_step"]: row[key] for row in run["history"] if key in row}


def _assign(target: Dict[str, Any], item: Any, value: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.setdefault(part, {})
    previous = target.get(path[-1])
    if isinstance(previous, dict) and isinstance(value, dict):
        previous.update(value)  # a later update of a whole section keeps its nested keys
    else:
        target[path[-1]] = value
