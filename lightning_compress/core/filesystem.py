"""File-system primitives of the crash-safe writers (:mod:`.atomic`): fsync of files and
folders, renames that never replace (``renameat2``), and the write lock of a target."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import time
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows: exclusive-create lock files instead of flock
    fcntl = None

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


class DirectoryLockedError(OSError):
    """Another process is writing the same directory; ``lock`` is its lock file, ``pid``
    the writer's process id (``None`` when unknown)."""

    def __init__(self, message: str, lock: Path, pid: Optional[int]) -> None:
        super().__init__(message)
        self.lock, self.pid = lock, pid


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


@contextlib.contextmanager
def write_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of the directory ``path`` (``.<name>.lock`` beside it, removed
    on release); yields the lock file's path. Every directory write takes it.

    Raises:
        DirectoryLockedError: another process (or another thread) holds it.
    """
    target = Path(os.path.realpath(path))
    lock = target.parent / f".{target.name}.lock"
    handle = _acquire(lock, target)
    try:
        yield lock
    finally:
        if fcntl is not None:  # unlink while holding it: see _acquire
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(handle)
        else:
            os.close(handle)
            with contextlib.suppress(OSError):
                os.unlink(lock)


def rename_noreplace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename ``source`` to ``target``, failing with ``FileExistsError`` if ``target``
    exists. Atomic with ``renameat2(RENAME_NOREPLACE)``; elsewhere an existence check
    then ``os.rename``, which on Linux can replace only an empty directory (a non-empty
    one or a file makes it fail), so nothing with content is ever lost."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(target))
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(target)) from None
        raise


def exchange(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swap two existing paths in one step (``renameat2(RENAME_EXCHANGE)``); ``False``
    where the kernel or file system cannot, and nothing happened."""
    return _renameat2(first, second, _RENAME_EXCHANGE)


def pid_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (``True`` where that cannot be told)."""
    if os.name != "posix":
        return True  # no cheap, harmless check: keep the temporary
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _renameat2(source, target, flags: int) -> bool:
    function = _libc_renameat2()
    if function is None:
        return False
    if function(-100, os.fsencode(source), -100, os.fsencode(target), flags) == 0:  # -100: AT_FDCWD
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), os.fspath(source), None, os.fspath(target))


@functools.lru_cache(maxsize=None)
def _libc_renameat2():
    """glibc's ``renameat2`` (2.28+), or ``None`` (other C libraries, other systems)."""
    if os.name != "posix":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _acquire(lock: Path, target: Path) -> int:
    if fcntl is None:
        try:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            pid = _lock_owner(lock)
            raise DirectoryLockedError(
                f"{target} is being written by process {pid or '(unknown)'}, which holds {lock}; if no such"
                f" process is running, delete {lock}", lock, pid) from None
    else:
        while True:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                pid = _lock_owner(lock)
                owner = f"process {pid}" if pid else "another process"
                raise DirectoryLockedError(
                    f"{target} is being written by {owner}, which holds {lock}; wait until it is done or write"
                    " somewhere else", lock, pid) from None
            except BaseException:
                os.close(handle)
                raise
            # The holder before us unlinks the file while holding it: if we locked a file
            # that is no longer the one at `lock`, start again.
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(handle), current):
                break
            os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(handle)
        raise
    return handle


def _lock_owner(lock: Path) -> Optional[int]:
    for _ in range(20):  # the holder writes its pid just after locking
        with contextlib.suppress(OSError, ValueError):
            return int(lock.read_text().strip())
        time.sleep(0.005)
    return None


__all__ = [
    "DirectoryLockedError",
    "exchange",
    "fsync_directory",
    "fsync_file",
    "pid_running",
    "rename_noreplace",
    "write_lock",
]


def user_path(path: str | os.PathLike, argument: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded, as a shell (and Lightning's
    ``ModelCheckpoint``) does: ``~/packed`` is in the home directory, not a folder named ``~``.

    Raises:
        ArgumentError: ``~user`` names no home directory (naming ``argument``).
    """
    from lightning_compress.core.validate import ArgumentError

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ArgumentError(argument, f"`{argument}` must be a path (a str or os.PathLike), got"
                                      f" {type(path).__name__} {path!r}")
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory"
        raise ArgumentError(argument, f"`{argument}`={str(path)!r}: its leading ~ names no home directory on this"
                                      " machine; give the path in full") from None


def distributed_checkpoint_problem(path: Path) -> Optional[str]:
    """Why the folder ``path`` cannot be read as a checkpoint file when it is a distributed
    checkpoint (torch.distributed.checkpoint's ``.metadata`` and a ``.distcp`` file per
    rank, as ``ModelParallelStrategy`` saves by default), naming the fix; else ``None``."""
    if not (path / ".metadata").is_file():
        return None
    return (f"{str(path)!r} is a distributed checkpoint (a folder of .distcp files, one per rank, as"
            " ModelParallelStrategy saves by default), which is read only by a run with as many processes; save a"
            " single-file checkpoint with ModelParallelStrategy(save_distributed_checkpoint=False) to export or"
            " inspect it")
