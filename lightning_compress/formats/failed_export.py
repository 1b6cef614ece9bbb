"""Nothing lost at the end: where an export's packed files go when their check fails.

:func:`~lightning_compress.export` packs the model, reads the files back and checks them
(parity, then the ONNX file when asked). When that check fails, the export directory
``<dir>`` is not written (whatever is found there has passed its check), but the packed
files are not dropped either: they are written, through the same crash-safe directory
write (:func:`~lightning_compress.core.atomic.atomic_write_directory`), to the sibling
``<dir>.failed-parity/``, with

- ``parity.json``: what failed (``failed``) and, when the parity check ran, its figures
  (``parity``: the thresholds, whether they were met, the layers worst first);
- ``compression.json`` recording the failure under ``failed_check`` (covered by its
  checksum), so the mark survives a renamed folder: :func:`load_packed` refuses the
  directory with :class:`~lightning_compress.formats.errors.FailedExportError` unless
  ``allow_failed_parity=True`` (then it loads with a warning), and ``inspect`` prints the
  failure first. Other loaders (``transformers``, onnxruntime) do not read the mark;
  the folder's name is the only one they show.

The sibling belongs to the export of ``<dir>`` and follows its ``overwrite``: without it,
an existing sibling stops the export before anything is packed (``CompressedExport``:
before training), so a stale failure is never mistaken for this run's and never replaced;
with it, a failing export replaces the sibling, and a passing one removes it once
``<dir>`` is in place.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from lightning_compress.core.atomic import atomic_write_directory
from lightning_compress.formats.errors import ExportError, FailedExportError, ParityError
from lightning_compress.formats.packed import METADATA_FILE, metadata_bytes

FAILED_SUFFIX = ".failed-parity"
PARITY_FILE = "parity.json"
FAILED_KEY = "failed_check"


def failed_path(out_dir: str | os.PathLike) -> Path:
    """``<out_dir>.failed-parity``: where an export to ``out_dir`` keeps files that failed their check."""
    path = Path(out_dir)
    if path.name in ("", ".", ".."):
        path = Path(os.path.realpath(path))
    return path.with_name(path.name + FAILED_SUFFIX)


def refuse_stale(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to export to ``out_dir`` while an earlier failed export's sibling exists,
    unless ``overwrite`` (which replaces or removes it).

    Raises:
        ExportError: the sibling exists and ``overwrite`` is false.
    """
    failed = failed_path(out_dir)
    if not overwrite and os.path.lexists(failed):
        raise ExportError(
            f"{failed} exists: an earlier export to {out_dir} failed its check and kept its files there; move it"
            " away (or delete it) first, or pass overwrite=True (in a recipe: export.overwrite=true), which replaces"
            f" it if this export fails too and removes it once {out_dir} is written"
        )


def recorded_failure(metadata: Mapping[str, Any]) -> Optional[str]:
    """The failed check a packed directory's ``compression.json`` records, or ``None``."""
    failure = metadata.get(FAILED_KEY)
    return None if failure is None else str(failure)


def refusal(directory: str | os.PathLike, failure: str) -> FailedExportError:
    """The error :func:`load_packed` raises for a directory that records ``failure``."""
    return FailedExportError(
        f"{directory} holds an export that failed its check ({failure}): it was kept so the run is not lost, but"
        " it is not verified to compute what the trained model computes. Read its parity.json; load it anyway"
        " with load_packed(..., allow_failed_parity=True), or export again with thresholds it meets"
    )


def keep_failed(
    out_dir: Path,
    files: Mapping[str, bytes],
    body: Dict[str, Any],
    report,
    error: Exception,
    *,
    overwrite: bool,
) -> ExportError:
    """Write the packed ``files`` (plus whatever the check had written, already in
    ``files``) to ``<out_dir>.failed-parity/`` with the check's report; return the error
    to raise, which names that directory (or says why the files could not be kept).

    ``body`` is the metadata as packed; ``report`` the :class:`ExportReport`, whose
    ``parity`` holds the figures when the parity check ran.
    """
    failed = failed_path(out_dir)
    what = f"{type(error).__name__}: {error}"
    parity = report.parity
    details: Dict[str, Any] = {"failed": what}
    body = {**body, FAILED_KEY: what}
    if parity is not None:  # the parity check ran (and passed, when the ONNX file failed its own)
        body["parity"] = _json_safe(parity.as_dict())
        details["parity"] = {**body["parity"], "summary": parity.summary(), "layers": _json_safe(parity.layers)}
    kept = dict(files)
    kept[METADATA_FILE] = metadata_bytes(body)
    kept[PARITY_FILE] = (json.dumps(details, indent=2, allow_nan=False) + "\n").encode()
    kept["report.txt"] = (f"EXPORT FAILED ITS CHECK: {what}\n{report.table()}\n").encode()
    try:
        atomic_write_directory(failed, kept, overwrite=overwrite)
    except Exception as write_error:  # a lock, a sibling that appeared meanwhile, a full disk
        where, directory = (f"; nothing was written to {out_dir}, and the packed files could not be kept in {failed}"
                            f" either ({type(write_error).__name__}: {write_error})"), None
    else:
        where, directory = (f"; nothing was written to {out_dir}: the packed files are kept in {failed}"
                            f" (the check's figures in {failed / PARITY_FILE}; load_packed refuses them unless"
                            " allow_failed_parity=True)"), failed
    if isinstance(error, ParityError):
        return ParityError(f"{error}{where}", error.report, directory)
    return ExportError(f"the check of the packed files failed ({what}){where}", directory)


def _json_safe(value: Any) -> Any:
    """``value`` with infinite or NaN floats (an SQNR of an exact layer) as ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, str)) else str(value)


__all__ = ["FAILED_SUFFIX", "PARITY_FILE", "failed_path", "keep_failed", "recorded_failure", "refusal", "refuse_stale"]
