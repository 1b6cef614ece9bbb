"""Crash-safe writes: a crash, an error or a SIGKILL at any instant leaves the old file (or
directory) or the new one, never half of either, and never neither for long.

Files (:func:`atomic_write`): written to ``.<name>.tmp-<pid>-<random>`` beside the target
(same folder, so the rename never crosses a file system), fsynced, renamed into place with
``os.replace``, and the folder is fsynced so the rename itself survives a power loss. A
temporary left by a writer that was killed (its pid no longer runs here) is removed by the
next write of that file.

Directories (:func:`atomic_write_directory`), step by step:

1. Lock: ``.<name>.lock`` beside the target, held with ``flock`` (the kernel drops it when
   the holder dies, so a lock file left by a killed writer does not block anyone). A
   second writer of the same target is refused at once with :class:`DirectoryLockedError`
   (naming the lock and the holder's pid): waiting would hold it for as long as the
   first one builds (an export's parity check, ONNX) only to then replace its result.
2. Recover and clean, under the lock: whatever lies beside the target from an earlier
   writer is debris, since that writer no longer holds the lock. If the target is
   missing and one ``.<name>.old-*`` lies beside it, an earlier swap was interrupted and
   that directory is put back (see below why it is complete); then every
   ``.<name>.tmp-*`` and ``.<name>.old-*`` is removed.
3. Build the new directory in ``.<name>.tmp-<pid>-<random>``: each file written and
   fsynced, then the folder.
4. Swap. Where the kernel and file system support it, one ``renameat2(RENAME_EXCHANGE)``
   swaps the new directory and the old one, so the target is never missing (the old one
   is then under the temporary's name). Otherwise two renames: the old directory to
   ``.<name>.old-<pid>-<random>``, the new one to the target. A new target (nothing there
   before) is renamed with ``RENAME_NOREPLACE`` (a rename that fails if the target
   exists), so a directory that appeared meanwhile is never replaced.
5. Fsync the parent folder; move ``.old-*`` to a ``.tmp-*`` name and delete it; unlock.
   The write has happened by then, so a failure here is a warning, not an error.

If the second rename fails, the old directory is renamed back and the error raised; if
that fails too, the first error is still the one raised, with a note saying where the old
directory is (``.old-*``, which the next write or load puts back; or ``.kept-*``, never
deleted, if something else took the target meanwhile).

Why step 2 may put ``.old-*`` back: a rename moves a directory whole, so ``.old-*`` is
always complete; it only exists between the two renames of step 4 (step 5 renames it to a
``.tmp-*`` name before deleting it); and step 2 leaves no ``.old-*`` before a new swap
starts, so a missing target has at most one ``.old-*`` to return. A write is committed by
its last rename; an interrupted one is rolled back, never forward. Loaders call
:func:`recover_directory` to do the same when they find the target missing.

``on_stage`` is a test seam: when set, it is called with each name in ``STAGES`` as a
directory write reaches it (the fault-injection tests kill the process there).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Tuple

from lightning_compress.core.filesystem import (
    DirectoryLockedError,
    exchange,
    fsync_directory,
    fsync_file,
    pid_running,
    rename_noreplace,
    write_lock,
)
from lightning_compress.core.notes import add_note

# "locked": lock held, debris removed, nothing built; "building": half of a file written;
# "built": the new directory complete, no rename yet; "aside": the old one moved to
# `.old-*`, the new one not yet in place (two-rename swap only); "installed": the new one
# in place, the old one not yet deleted; "removed": the old one deleted, lock still held.
STAGES = ("locked", "building", "built", "aside", "installed", "removed")
on_stage: Optional[Callable[[str], None]] = None

_DEBRIS = re.compile(r"\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")


class InterruptedWriteError(OSError):
    """A directory write was interrupted and the previous version could not be put back
    automatically; the message says where it is and what to rename."""


def replace_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished file ``source`` onto ``target`` (same folder) durably: fsync its
    data, rename, fsync the folder. The last step of every atomic file write."""
    fsync_file(source)
    os.replace(source, target)
    fsync_directory(Path(target).parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace ``path`` with the file ``write(temporary)`` creates, in one rename.

    ``write`` receives a path in the target's folder (an empty file already exists there)
    and fills it, e.g. ``lambda p: save_file(tensors, str(p))``. Parent folders are
    created. If ``write`` raises, the temporary is removed and ``path`` is untouched.
    Temporaries of this file left by killed writers are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale, kind, pid in _debris(path):
        if kind == "tmp" and pid is not None and pid != os.getpid() and not pid_running(pid) and stale.is_file():
            with contextlib.suppress(OSError):
                stale.unlink()
    temporary = _sibling(path, "tmp")
    # An ordinary exclusive create (not mkstemp) so the file gets the usual umask mode.
    temporary.open("xb").close()
    mode = temporary.stat().st_mode & 0o777
    try:
        write(temporary)
        # A writer that recreates the file may give it its own mode: safetensors' writes
        # 0600, which a server process of another user (a vLLM container) cannot read.
        if temporary.stat().st_mode & 0o777 != mode:
            temporary.chmod(mode)
        replace_file(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename; a crash leaves the old file or the new one."""
    atomic_write(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_directory(
    path: str | os.PathLike,
    files: Mapping[str, bytes],
    *,
    overwrite: bool = False,
    finish: Optional[Callable[[Path], Mapping[str, bytes]]] = None,
    keep_others: bool = False,
) -> None:
    """Write the directory ``path`` holding ``files`` (name -> bytes) all at once.

    The steps are in the module docstring: under a lock, in a temporary sibling folder,
    then swapped in. ``finish(temporary)`` runs before the swap (to read the files back,
    say) and returns files to add or replace; if it raises, nothing is written. An
    existing ``path`` is replaced only with ``overwrite=True``, and the old one is
    deleted only once the new one is in place; without ``overwrite`` nothing is ever
    replaced, not even a directory that appears while the new one is being built.
    ``keep_others=True`` carries every entry of the old directory that ``files`` does not
    name into the new one (as hard links, so nothing is copied).

    Raises:
        FileExistsError: ``path`` exists (or appeared during the write) and ``overwrite``
            is false.
        NotADirectoryError: ``path`` exists and is not a directory.
        DirectoryLockedError: another process is writing ``path``.
        InterruptedWriteError: an earlier interrupted write left several old versions,
            or one that cannot be moved (named in the message).
        ValueError: ``path`` is a mount point, or the current working directory or holds
            it (replacing those fails or strands this process).
    """
    target = _target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with write_lock(target):
        _recover(target)
        _remove_debris(target)
        exists = os.path.lexists(target)
        if exists and not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a directory")
        if exists and not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        if exists:
            _refuse_unreplaceable(target)
        _reached("locked")
        temporary = _sibling(target, "tmp")
        temporary.mkdir()
        try:
            if keep_others and exists:
                _link_tree(target, temporary, skip=set(files))
            _write_files(temporary, files)
            if finish is not None:
                _write_files(temporary, finish(temporary))
            fsync_directory(temporary)
            _reached("built")
            old = _install(temporary, target, exists, overwrite)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        _settle(target, old)


def remove_directory(path: str | os.PathLike) -> bool:
    """Delete the directory ``path`` under its write lock, first renamed to a ``.tmp-*``
    name: it never lies half-deleted under its own name (the next write of ``path`` removes
    what an interrupted removal left). Returns whether there was one to delete.

    Raises:
        DirectoryLockedError: another process is writing ``path``.
        NotADirectoryError: ``path`` exists and is not a directory.
    """
    target = _target(path)
    if not os.path.lexists(target):
        return False
    with write_lock(target):
        if not os.path.lexists(target):
            return False
        if not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a directory")
        garbage = _sibling(target, "tmp")
        os.rename(target, garbage)
        fsync_directory(target.parent)
        shutil.rmtree(garbage, ignore_errors=True)
    return True


def recover_directory(path: str | os.PathLike) -> bool:
    """Undo an interrupted write of the directory ``path``, for readers: when ``path`` is
    missing and the old version lies beside it as ``.<name>.old-*`` (the
    writer was killed between its two renames), put it back. Returns whether it did.
    Cheap when ``path`` exists.

    Raises:
        DirectoryLockedError: a writer is working on ``path`` right now.
        InterruptedWriteError: the old version could not be put back (the message says
            where it is and what to rename).
    """
    target = _target(path)
    olds = [p for p, kind, _ in _debris(target) if kind == "old"]
    if os.path.lexists(target) or not olds:
        return False
    try:
        with write_lock(target):
            return _recover(target)
    except (DirectoryLockedError, InterruptedWriteError):
        raise
    except OSError as error:  # cannot even create the lock (read-only folder, say)
        raise InterruptedWriteError(
            f"{target} is missing: an interrupted write left its previous version at {olds[0]}, which could not be"
            f" put back ({error}); rename it to {target}"
        ) from error


# ---------------------------------------------------------------- internals
def _reached(stage: str) -> None:
    if on_stage is not None:
        on_stage(stage)


def _target(path: str | os.PathLike) -> Path:
    # Absolute with symlinks resolved: `name` and `parent` are real ("." has no name), and a
    # link to a directory gets its destination replaced, not the link.
    return Path(os.path.realpath(path))


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _debris(path: Path) -> List[Tuple[Path, str, Optional[int]]]:
    """``(path, "tmp" | "old", writer pid or None)`` for the temporaries of ``path``."""
    prefix = f".{path.name}"
    found = []
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                match = entry.name.startswith(prefix) and _DEBRIS.fullmatch(entry.name[len(prefix):])
                if match:
                    pid = match["pid"]
                    found.append((Path(entry.path), match["kind"], int(pid) if pid else None))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return sorted(found)


def _recover(target: Path) -> bool:
    """Under the lock: put a lone ``.old-*`` back where the target is missing."""
    olds = [p for p, kind, _ in _debris(target) if kind == "old"]
    if os.path.lexists(target) or not olds:
        return False
    if len(olds) > 1 or not olds[0].is_dir():
        raise InterruptedWriteError(
            f"{target} is missing and earlier versions lie beside it ({', '.join(p.name for p in olds)}); move"
            f" the one to keep to {target}")
    try:
        rename_noreplace(olds[0], target)
        fsync_directory(target.parent)
    except OSError as error:
        raise InterruptedWriteError(
            f"{target} is missing: an interrupted write left its previous version at {olds[0]}, which could not"
            f" be put back ({error}); rename it to {target}") from error
    return True


def _remove_debris(target: Path) -> None:
    """Under the lock, with the target recovered: every temporary is a dead writer's."""
    for stale, kind, _ in _debris(target):
        try:
            if kind == "old":  # first out of the `.old-*` names, which recovery trusts
                garbage = _sibling(target, "tmp")
                os.rename(stale, garbage)
                stale = garbage
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        except OSError as error:
            if kind == "old":  # a second `.old-*` would make a later recovery ambiguous
                raise InterruptedWriteError(f"cannot remove {stale}, left by an earlier write ({error});"
                                            " remove it by hand") from error


def _refuse_unreplaceable(target: Path) -> None:
    if os.path.ismount(target):
        raise ValueError(f"{target} is a mount point, which cannot be replaced: write to a directory inside it")
    with contextlib.suppress(OSError):
        cwd = os.getcwd()
        if cwd == str(target) or cwd.startswith(str(target) + os.sep):
            raise ValueError(f"{target} is (or holds) the current working directory; replacing it would leave"
                             " this process in a deleted folder: write to another directory or change directory first")


def _write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        view = memoryview(data)
        with open(directory / name, "wb") as handle:
            handle.write(view[: len(view) // 2])
            handle.flush()
            _reached("building")
            handle.write(view[len(view) // 2:])
            handle.flush()
            os.fsync(handle.fileno())


def _link_tree(source: Path, destination: Path, skip: set) -> None:
    def link_or_copy(src, dst):
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:  # a file system without hard links
            shutil.copy2(src, dst, follow_symlinks=False)

    shutil.copytree(source, destination, symlinks=True, copy_function=link_or_copy, dirs_exist_ok=True,
                    ignore=lambda folder, names: [n for n in names if Path(folder) == source and n in skip])
    for folder, _, _ in os.walk(destination):
        fsync_directory(folder)


def _install(temporary: Path, target: Path, existed: bool, overwrite: bool) -> Optional[Path]:
    """Put the finished ``temporary`` at ``target`` (which ``existed`` when checked under
    the lock); returns where the old directory now is (to delete), or ``None``."""
    if not existed:
        try:
            rename_noreplace(temporary, target)
            return None
        except FileExistsError:
            if not overwrite:
                raise FileExistsError(f"{target} appeared while it was being written and was left as it is;"
                                      " pass overwrite=True to replace it") from None
            if not target.is_dir():
                raise NotADirectoryError(f"{target} appeared as a file while it was being written and was left"
                                         " as it is") from None
    try:
        if exchange(temporary, target):
            return temporary  # now holding the old directory
    except FileNotFoundError:  # the old one vanished meanwhile
        rename_noreplace(temporary, target)
        return None
    aside = _sibling(target, "old")
    try:
        os.rename(target, aside)  # a fresh name: nothing there to replace
        _reached("aside")
        rename_noreplace(temporary, target)
    except BaseException as error:
        if os.path.lexists(aside) and os.path.lexists(temporary):  # moved aside, new one not in
            _put_back(aside, target, error)
        raise
    return aside


def _put_back(aside: Path, target: Path, error: BaseException) -> None:
    """Undo the first rename of a swap; if that fails too, ``error`` stays the one raised
    and says where the old directory is."""
    try:
        rename_noreplace(aside, target)
        return
    except BaseException as second:
        where, then = aside, " (the next write or load of it does that)"
        if os.path.lexists(target):  # something else took the target: keep the old one
            with contextlib.suppress(OSError):  # under a name that no write deletes
                kept = _sibling(target, "kept")
                os.rename(aside, kept)
                where, then = kept, ""
        add_note(error, f"The old {target.name} could not be put back ({second!r}); it is at {where}: rename it"
                         f" to {target}{then}")


def _settle(target: Path, old: Optional[Path]) -> None:
    """After the swap: the write has happened, so nothing here raises an OSError."""
    try:
        fsync_directory(target.parent)
    except OSError as error:
        warnings.warn(f"{target} is written, but its folder could not be synced ({error}); a power loss now"
                      " could still bring back the old version", RuntimeWarning, stacklevel=3)
    _reached("installed")
    if old is not None:
        try:
            if old.name.startswith(f".{target.name}.old-"):
                garbage = _sibling(target, "tmp")
                os.rename(old, garbage)  # out of the `.old-*` names before deleting it
                old = garbage
            shutil.rmtree(old)
        except OSError as error:
            warnings.warn(f"{target} is written, but the old version could not be removed from {old} ({error});"
                          " the next write of it removes it", RuntimeWarning, stacklevel=3)
    _reached("removed")


__all__ = [
    "DirectoryLockedError",
    "InterruptedWriteError",
    "STAGES",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_directory",
    "exchange",
    "fsync_directory",
    "fsync_file",
    "on_stage",
    "recover_directory",
    "remove_directory",
    "rename_noreplace",
    "replace_file",
    "write_lock",
]
