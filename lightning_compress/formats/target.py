"""Whether an export directory can be written, asked before anything is trained.

``CompressedExport`` checks its ``dirpath`` at setup, so a path the export at the end of
fit could not write stops the run before its first step instead of after its last:

- a ``dirpath`` that is a file is refused whatever ``overwrite`` says (the export writes a
  directory and never replaces a file);
- with ``overwrite=True``, an existing ``dirpath`` that is a mount point, or that is or
  holds the current working directory, is refused (replacing it would fail, or strand
  this process in a deleted folder), and so is one that holds files but no
  ``compression.json`` (:func:`refuse_foreign`): overwrite replaces an earlier export
  or an empty folder, never a folder of other files (a home directory, say);
- a ``dirpath`` that is or holds the folder of the run's checkpoints is refused
  (:func:`check_keeps_apart`: ``overwrite=True`` would delete them, and without it the
  export would find the folder taken);
- the folder the export creates its files in (``dirpath``'s parent, created if missing)
  must be creatable: its nearest existing ancestor must be a directory, not a file, in
  which this process can create entries. That is asked with ``os.access`` and then by
  creating and removing an empty folder there (``.lightning-compress-probe-*``), since
  ``os.access`` says yes to root where the file system says no (``/proc``, say).

A problem that appears during training (a full disk, permissions changed, a folder made
at ``dirpath`` meanwhile) is handled at the end instead: see :func:`~lightning_compress.formats.failed_export.keep_elsewhere`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

from lightning_compress.core.notes import first_four
from lightning_compress.core.validate import ArgumentError
from lightning_compress.formats.companions import COMPANION_FILES, REPORT_FILE
from lightning_compress.formats.failed_export import PARITY_FILE
from lightning_compress.formats.packed import METADATA_FILE, WEIGHTS_FILE

_CHECKED = "; checked before training, so no run is lost"
_ELSEWHERE = "choose another `dirpath` (in a recipe: export.dirpath)"


def check_export_target(dirpath: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a ``dirpath`` an export could not write (see the module docstring).

    Does not refuse an existing directory: whether that may be replaced is ``overwrite``'s
    business, checked by the caller.

    Raises:
        ArgumentError: (naming ``dirpath``) what is wrong with it and what to do instead.
    """
    target = Path(os.path.realpath(dirpath))  # a link is followed, as the export follows it
    if target.exists() and not target.is_dir():
        raise ArgumentError(
            "dirpath",
            f"CompressedExport: `dirpath` {dirpath} is a file, not a directory; the export writes a directory and"
            f" never replaces a file (overwrite=True replaces only a directory): {_ELSEWHERE}, or move the file"
            f" away{_CHECKED}",
        )
    if overwrite and target.is_dir():
        _refuse_unreplaceable(dirpath, target)
    ancestor = target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArgumentError(
            "dirpath",
            f"CompressedExport: `dirpath` {dirpath} cannot be created: {ancestor} is a file, not a folder: {_ELSEWHERE},"
            f" or move the file away{_CHECKED}",
        )
    problem = _cannot_create_in(ancestor)
    if problem is not None:
        where = "its folder" if ancestor == target.parent else "its nearest existing folder"
        raise ArgumentError(
            "dirpath",
            f"CompressedExport: `dirpath` {dirpath} cannot be written: this process cannot create files in {ancestor},"
            f" {where} ({problem}); {_ELSEWHERE} in a folder you can write to, or fix that folder's"
            f" permissions{_CHECKED}",
        )


def check_keeps_apart(dirpath: str | os.PathLike, kept: Mapping[str, str | os.PathLike], overwrite: bool,
                      owned: Optional[Mapping[str, str | os.PathLike]] = None) -> None:
    """Refuse a ``dirpath`` that is or holds a path the run writes itself (``kept``, what
    each is -> its path: a ModelCheckpoint's folder), existing yet or not: the export at
    the end replaces ``dirpath`` whole with ``overwrite=True``, deleting it, and without
    ``overwrite`` finds ``dirpath`` made by it and cannot write there. A ``dirpath`` inside
    a folder of ``owned`` (W&B's runs, each a folder of its own) is refused too.

    Raises:
        ArgumentError: (naming ``dirpath``) which path it holds, or lies in.
    """
    target = _followed(dirpath)
    for what, path in (owned or {}).items():
        if _followed(path) in target.parents:
            raise ArgumentError(
                "dirpath",
                f"CompressedExport: `dirpath` {dirpath} lies in {what} ({path}), whose folders are its own (runs"
                f" waiting for `wandb sync`, `latest-run`, this run's): {_ELSEWHERE}{_CHECKED}",
            )
    held = first_held(dirpath, {**kept, **(owned or {})})
    if held is not None:
        what, path = held
        fate = ("which overwrite=True would delete with the folder it replaces at the end of the run" if overwrite
                else "which the run creates, so the export at the end would find `dirpath` taken")
        raise ArgumentError(
            "dirpath",
            f"CompressedExport: `dirpath` {dirpath} holds {what} ({path}), {fate}: {_ELSEWHERE}, or keep {what}"
            f" outside it{_CHECKED}",
        )


def first_held(dirpath: str | os.PathLike, paths: Mapping[str, str | os.PathLike]) -> Optional[Tuple[str, Any]]:
    """The first ``(what, path)`` of ``paths`` that is ``dirpath`` or lies inside it (``~``
    expanded and links followed on both sides, as the export and the readers do), if any."""
    target = _followed(dirpath)
    for what, path in paths.items():
        held = _followed(path)
        if held == target or target in held.parents:
            return what, path
    return None


def _followed(path: str | os.PathLike) -> Path:
    """``path`` as the export and the readers reach it: ``~`` expanded, links followed."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def export_files() -> frozenset:
    """The names an export writes into its directory (whatever its formats)."""
    return frozenset({METADATA_FILE, WEIGHTS_FILE, REPORT_FILE, PARITY_FILE, *COMPANION_FILES})


def foreign_contents(directory: str | os.PathLike) -> Optional[str]:
    """Why ``overwrite=True`` must not replace the existing directory ``directory``: a
    description of what it holds that no export writes (any entry, without
    ``compression.json``: not an export at all), or ``None`` (empty, or only an export's
    files: complete, or a failed check's)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None  # (absent, a file, or not listable: the write itself reports it)
    if METADATA_FILE in names:
        others = [name for name in names if name not in export_files()]
        return None if not others else (
            f"it holds an earlier export and {', '.join(first_four(others))}, which no export writes and"
            " overwrite=True would delete with it")
    return None if not names else (
        f"it holds {', '.join(first_four(names))} but no {METADATA_FILE}, so it is not an earlier export;"
        " overwrite=True replaces only an export's folder (or an empty one), never other files")


def refuse_foreign(dirpath: str | os.PathLike) -> None:
    """Refuse to replace the existing directory ``dirpath`` when it is not an export
    (:func:`foreign_contents`); called for ``overwrite=True`` once the checks of the
    folders a run keeps (:func:`check_keeps_apart`) have named theirs.

    Raises:
        ArgumentError: (naming ``dirpath``) what it holds and what to do instead.
    """
    foreign = foreign_contents(dirpath)
    if foreign is not None:
        raise ArgumentError(
            "dirpath", f"CompressedExport: `dirpath` {dirpath} cannot be replaced: {foreign}: {_ELSEWHERE}, or empty"
            f" that folder{_CHECKED}",
        )


def _refuse_unreplaceable(dirpath, target: Path) -> None:
    if os.path.ismount(target):
        raise ArgumentError(
            "dirpath",
            f"CompressedExport: `dirpath` {dirpath} is a mount point, which overwrite=True cannot replace: write to a"
            f" directory inside it{_CHECKED}",
        )
    with contextlib.suppress(OSError):
        cwd = os.getcwd()
        if cwd == str(target) or cwd.startswith(str(target) + os.sep):
            raise ArgumentError(
                "dirpath",
                f"CompressedExport: `dirpath` {dirpath} is (or holds) the current working directory, which"
                f" overwrite=True would replace, leaving this process in a deleted folder: {_ELSEWHERE}, or change"
                f" directory first{_CHECKED}",
            )


def _cannot_create_in(folder: Path) -> Optional[str]:
    """Why this process cannot create entries in ``folder``, or ``None`` when it can."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "no write permission"
    try:
        probe = tempfile.mkdtemp(prefix=".lightning-compress-probe-", dir=folder)
    except OSError as error:
        return error.strerror or str(error)
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


__all__ = ["check_export_target", "check_keeps_apart", "export_files", "foreign_contents", "refuse_foreign"]
