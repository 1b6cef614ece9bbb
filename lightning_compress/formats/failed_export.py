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

When a directory cannot be written at all (a full disk, permissions changed during
training, another export holding it, a file put in its place), the files go to a new
folder of the system's temporary directory instead (``$TMPDIR``, else ``/tmp``:
``lightning-compress-<name>-*/<name>``), and the error names it: :func:`keep_elsewhere`
for ``<dir>`` (the export is written and checked there as it would have been in
``<dir>``, so a passing one is a complete export to move into place), and
:func:`keep_failed` for ``<dir>.failed-parity``. That folder may be cleared (a reboot
clears a ``/tmp`` in memory), so the message says to move it. Only when that fails too is
nothing written; the model is then still in memory, and the error says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from lightning_compress.core.atomic import atomic_write_directory
from lightning_compress.core.validate import ArgumentError
from lightning_compress.formats.errors import ExportError, FailedExportError, ParityError
from lightning_compress.formats.outputs import raised_by_the_model
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
        " with load_packed(..., allow_failed_parity=True), or export again once what it says is fixed"
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
    refused = " (the check's figures in {}; load_packed refuses them unless allow_failed_parity=True)"
    try:
        atomic_write_directory(failed, kept, overwrite=overwrite)
    except Exception as write_error:  # a lock, a sibling that appeared meanwhile, a full disk
        lost = f"; nothing was written to {out_dir}, and the packed files could not be kept in {failed} either"
        lost += f" ({type(write_error).__name__}: {write_error})"
        try:
            directory = _in_temporary_folder(failed.name, lambda folder: atomic_write_directory(folder, kept))
        except Exception as last_error:
            where, directory = f"{lost}, nor in the system's temporary directory ({last_error}){_IN_MEMORY}", None
        else:
            where = f"{lost}: they are kept in {directory} instead{refused.format(directory / PARITY_FILE)}{_MOVE}"
    else:
        where, directory = (f"; nothing was written to {out_dir}: the packed files are kept in {failed}"
                            f"{refused.format(failed / PARITY_FILE)}"), failed
    if isinstance(error, ParityError):
        return ParityError(f"{error}{where}", error.report, directory)
    notes = "".join(f" {note}" for note in getattr(error, "__notes__", ()))
    if raised_by_the_model(error) or isinstance(error, ArgumentError):  # not the files' fault
        return ExportError(f"the packed files could not be checked: {what}.{notes}{where}", directory)
    return ExportError(f"the check of the packed files failed ({what}){notes}{where}", directory)


def keep_elsewhere(out_dir: Path, error: OSError, write: Callable[[Path], None]) -> ExportError:
    """``out_dir`` could not be written (``error``: not its check, which had not failed):
    export to ``<system temporary directory>/lightning-compress-<name>-*/<name>`` instead
    with ``write`` (which writes and checks a directory as the export of ``out_dir`` does)
    and return the error to raise, naming where the files are.

    Returns a :class:`ParityError` (or ``ExportError``) when the check fails there, with
    ``directory`` where :func:`keep_failed` kept the files; an ``ExportError`` with
    ``directory`` the complete export otherwise, or ``None`` if nothing could be written.
    """
    lead = f"{out_dir} could not be written ({type(error).__name__}: {error})"
    try:
        folder = _in_temporary_folder(Path(os.path.realpath(out_dir)).name or "export", write)
    except OSError as last_error:
        return ExportError(f"{lead}, nor could a folder in the system's temporary directory"
                           f" ({type(last_error).__name__}: {last_error}){_IN_MEMORY}")
    except ExportError as failed:  # written there, but its check failed: kept beside it
        message = f"{lead}; exported to the system's temporary directory instead, where {failed}"
        if isinstance(failed, ParityError):
            return ParityError(message, failed.report, failed.directory)
        return ExportError(message, failed.directory)
    move = (f"e.g. mv {folder} <a new path>, or remove or rename {out_dir} first" if isinstance(error, FileExistsError)
            else f"e.g. mv {folder} {out_dir}, once that can be written")
    return ExportError(f"{lead}; the export is complete and checked in {folder} instead{_MOVE} ({move})", folder)


_IN_MEMORY = (": nothing was written. The trained model is still in memory (the module passed to fit or export):"
              " export it again to a directory that can be written (free some space, or choose another dirpath)")
_MOVE = ", in the system's temporary directory, which may be cleared: move the folder somewhere safe"


def _in_temporary_folder(name: str, write: Callable[[Path], None]) -> Path:
    """``write`` the directory ``<new folder of the system's temporary directory>/<name>``;
    returns it. The new folder is removed again if ``write`` raises and left it empty (a
    failed check keeps its files beside ``<name>``, in that folder)."""
    root = Path(tempfile.mkdtemp(prefix=f"lightning-compress-{name}-"))
    try:
        write(root / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(root)
        raise
    return root / name


def _json_safe(value: Any) -> Any:
    """``value`` with infinite or NaN floats (an SQNR of an exact layer) as ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, str)) else str(value)


__all__ = ["FAILED_SUFFIX", "PARITY_FILE", "failed_path", "keep_elsewhere", "keep_failed", "recorded_failure",
           "refusal", "refuse_stale"]
