"""Crash-safe writes: a crash or an error leaves the old file (or directory) or the new one,
never half of either.

Everything is written beside its target (same folder, so the final rename never crosses a
file system), flushed and fsynced, renamed into place with ``os.replace``, and the folder
holding it is fsynced so the rename itself survives a power loss. Temporaries are named
``.<target>.tmp-<random>`` and removed on failure.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Mapping, Optional


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make the entries of ``directory`` (files created, renamed or deleted) durable.

    A no-op where folders cannot be opened for fsync (Windows).
    """
    if not hasattr(os, "O_DIRECTORY"):
        return
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    except OSError as err:
        # Some filesystems (network mounts, FUSE) cannot fsync a folder; the data is in place.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(handle)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush the contents of the file at ``path`` to disk."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


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
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(path, "tmp")
    # An ordinary exclusive create (not mkstemp) so the file gets the usual umask mode.
    temporary.open("xb").close()
    try:
        write(temporary)
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
) -> None:
    """Write the directory ``path`` holding ``files`` (name -> bytes) all at once.

    The files are written and fsynced in a temporary sibling folder, which is then renamed
    to ``path``. ``finish(temporary)`` runs before the rename (to read the files back, say)
    and returns files to add or replace; if it raises, nothing is written. An existing
    ``path`` is replaced only with ``overwrite=True``, and the old one is deleted only once
    the new one is in place.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        NotADirectoryError: ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(path, "tmp")
    temporary.mkdir()
    old = None
    try:
        _write_files(temporary, files)
        if finish is not None:
            _write_files(temporary, finish(temporary))
        fsync_directory(temporary)
        if path.exists():
            old = _sibling(path, "old")
            os.replace(path, old)
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # the new one never arrived: put the old one back
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        with open(directory / name, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_directory",
    "fsync_directory",
    "fsync_file",
    "replace_file",
]
