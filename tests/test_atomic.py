"""core/atomic.py on real files: a write lands whole or not at all, and leaves no temporaries.

Failures are injected by raising from the writer/finish callbacks, by wrapping ``os.replace``
or ``rename_noreplace`` (the module calls them through its globals), or from the
``atomic.on_stage`` test seam; the filesystem itself is real. Directory writes run both ways
of swapping (``swap`` fixture): one ``renameat2(RENAME_EXCHANGE)``, and the two renames used
where the file system cannot exchange. Kills (SIGKILL) are in tests/test_atomic_crash.py.
"""

import os
import stat
import subprocess
import sys
import threading

import pytest
import torch

from lightning_compress.core import atomic, filesystem
from lightning_compress.core.atomic import (
    DirectoryLockedError,
    InterruptedWriteError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_directory,
    recover_directory,
    write_lock,
)


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Pin the process umask (restored afterwards) so expected modes are exact."""
    previous = os.umask(0o022)
    yield 0o022
    os.umask(previous)


def fail_replace_into(monkeypatch, target, error=OSError("injected")):
    """Make ``os.replace(..., target)`` raise when the source is a temporary; every other
    rename (moving the old directory aside, putting it back) still really happens."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.fspath(dst) == os.fspath(target) and ".tmp-" in os.path.basename(src):
            raise error
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", replace)


@pytest.fixture(params=["exchange", "two renames"])
def swap(request, monkeypatch):
    """How an existing directory is swapped: "two renames" is the path of file systems
    without RENAME_EXCHANGE (the old directory goes to ``.<name>.old-*`` in between)."""
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    return request.param


def at_stage(monkeypatch, stage, action):
    """Run ``action()`` when a directory write reaches ``stage`` (see ``atomic.STAGES``)."""
    monkeypatch.setattr(atomic, "on_stage", lambda reached: action() if reached == stage else None)


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- files -------------------------------------------------------------------------------


def test_new_file_lands_with_exact_bytes_and_parents(tmp_path):
    target = tmp_path / "a" / "b" / "weights.bin"
    data = bytes(range(256)) * 3
    atomic_write_bytes(target, data)
    assert target.read_bytes() == data
    assert listing(target.parent) == ["weights.bin"]  # no temporary beside it


def test_existing_file_is_replaced(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old contents that are longer than the new ones")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"  # replaced, not overwritten in place (no tail left)
    assert listing(tmp_path) == ["f.bin"]


def test_writer_gets_an_empty_sibling_temporary(tmp_path):
    seen = []

    def write(temporary):
        seen.append((temporary.parent, temporary.name, temporary.read_bytes()))
        temporary.write_bytes(b"x")

    atomic_write(tmp_path / "f.bin", write)
    # Same folder, so the rename never crosses a file system; named as the docstring says.
    assert seen[0][0] == tmp_path and seen[0][1].startswith(".f.bin.tmp-") and seen[0][2] == b""
    assert (tmp_path / "f.bin").read_bytes() == b"x"


@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_failing_or_killed_writer_leaves_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def write(temporary):
        with open(temporary, "wb") as handle:
            handle.write(b"half of the new")  # partially written when it dies
            raise error

    with pytest.raises(type(error)):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["f.bin"]


def test_failed_rename_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    fail_replace_into(monkeypatch, target)
    with pytest.raises(OSError, match="injected"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == ["f.bin"]


def test_new_file_gets_umask_mode_not_0600(tmp_path, umask):
    # mkstemp would give 0600, which breaks files shared with other users/processes.
    atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert mode(tmp_path / "f.bin") == 0o666 & ~umask == 0o644


def test_a_writer_that_recreates_the_file_0600_still_lands_with_the_umask_mode(tmp_path, umask):
    # safetensors' save_file writes 0600 (a teacher-output cache, a streamed export's weights).
    from safetensors.torch import save_file

    atomic_write(tmp_path / "t.safetensors", lambda temporary: save_file({"a": torch.zeros(2)}, str(temporary)))
    assert mode(tmp_path / "t.safetensors") == 0o666 & ~umask == 0o644


# ---- directories -------------------------------------------------------------------------


FILES = {"model.safetensors": b"\x00\x01weights", "config.json": b'{"a": 1}\n'}


def test_new_directory_lands_complete(tmp_path, umask):
    target = tmp_path / "out"
    atomic_write_directory(target, FILES)
    assert contents(target) == FILES
    assert listing(tmp_path) == ["out"]
    assert mode(target) == 0o777 & ~umask and mode(target / "config.json") == 0o666 & ~umask


def test_finish_sees_the_files_and_adds_or_replaces(tmp_path):
    seen = {}

    def finish(temporary):
        seen.update(contents(temporary))
        return {"config.json": b"final", "README.md": b"hi"}

    atomic_write_directory(tmp_path / "out", FILES, finish=finish)
    assert seen == FILES
    assert contents(tmp_path / "out") == {**FILES, "config.json": b"final", "README.md": b"hi"}


def test_existing_directory_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write_directory(target, FILES)
    assert contents(target) == {"keep.txt": b"old"}
    assert listing(tmp_path) == ["out"]


def test_existing_file_is_not_replaced_by_a_directory(tmp_path):
    target = tmp_path / "out"
    target.write_bytes(b"a file")
    with pytest.raises(NotADirectoryError):
        atomic_write_directory(target, FILES, overwrite=True)
    assert target.read_bytes() == b"a file"
    assert listing(tmp_path) == ["out"]


def test_overwrite_replaces_whole_directory_and_leaves_nothing_temporary(tmp_path, swap):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"stale")  # must not survive: replaced, not merged
    (target / "config.json").write_bytes(b"old")
    atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == FILES
    assert listing(tmp_path) == ["out"]  # neither .out.tmp-* nor .out.old-* left


@pytest.mark.parametrize("error", [ValueError("finish failed"), KeyboardInterrupt()])
def test_failure_while_building_keeps_old_directory(tmp_path, error, swap):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"old")

    def finish(temporary):
        raise error  # the new files are half-built in the temporary folder

    with pytest.raises(type(error)):
        atomic_write_directory(target, FILES, overwrite=True, finish=finish)
    assert contents(target) == {"keep.txt": b"old"}
    assert listing(tmp_path) == ["out"]


def test_failure_while_building_new_directory_leaves_nothing(tmp_path):
    def finish(temporary):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_directory(tmp_path / "out", FILES, finish=finish)
    assert listing(tmp_path) == []




@pytest.mark.parametrize("error", [OSError("injected"), KeyboardInterrupt()])
def test_failed_final_rename_puts_old_directory_back(tmp_path, monkeypatch, error):
    # Two renames: the old directory is moved aside, then the new one fails to arrive.
    monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    target = old_directory(tmp_path)
    fail_rename(monkeypatch, lambda src, dst: dst == target and ".tmp-" in src.name, error)
    with pytest.raises(type(error)):
        atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == {"keep.txt": b"old"}  # back in place
    assert listing(tmp_path) == ["out"]


def test_interrupt_between_the_two_renames_puts_old_directory_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    target = old_directory(tmp_path)

    def interrupt():
        assert not target.exists() and [n for n in listing(tmp_path) if ".out.old-" in n]  # really in between
        raise KeyboardInterrupt

    at_stage(monkeypatch, "aside", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == {"keep.txt": b"old"}
    assert listing(tmp_path) == ["out"]


# ---- failures after or during the swap ------------------------------------------------------


def old_directory(tmp_path, name="out"):
    target = tmp_path / name
    target.mkdir()
    (target / "keep.txt").write_bytes(b"old")
    return target


def fail_rename(monkeypatch, when, error):
    """Make ``atomic.rename_noreplace(src, dst)`` raise ``error`` where ``when(src, dst)``."""
    real = atomic.rename_noreplace

    def rename(src, dst):
        if when(atomic.Path(src), atomic.Path(dst)):
            raise error
        return real(src, dst)

    monkeypatch.setattr(atomic, "rename_noreplace", rename)


def test_failed_parent_fsync_after_the_swap_warns_and_finishes(tmp_path, monkeypatch, swap):
    # The new directory is in place: the write happened, so it must not raise (and must still
    # remove the old one) just because the folder could not be synced.
    target = old_directory(tmp_path)
    real = atomic.fsync_directory

    def fsync_directory(folder):
        if atomic.Path(folder) == tmp_path and target.joinpath("model.safetensors").exists():
            raise OSError(5, "Input/output error")
        real(folder)

    monkeypatch.setattr(atomic, "fsync_directory", fsync_directory)
    with pytest.warns(RuntimeWarning, match="could not be synced"):
        atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == FILES
    assert listing(tmp_path) == ["out"]  # no .out.old-* left behind


def test_failed_put_back_keeps_the_first_error_and_says_where_the_old_one_is(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    target = old_directory(tmp_path)
    fail_rename(monkeypatch, lambda src, dst: dst == target and ".tmp-" in src.name, OSError("first"))
    fail_rename(monkeypatch, lambda src, dst: dst == target and ".old-" in src.name, OSError("second"))
    with pytest.raises(OSError) as caught:
        atomic_write_directory(target, FILES, overwrite=True)
    assert str(caught.value) == "first"  # the cause stays the error raised
    [aside] = [n for n in listing(tmp_path) if n.startswith(".out.old-")]
    assert any(aside in note and "second" in note for note in caught.value.__notes__)
    assert listing(tmp_path) == [aside]  # the new one is gone, the old one kept whole
    monkeypatch.undo()
    assert recover_directory(target) is True  # what a loader does (and the next write)
    assert contents(target) == {"keep.txt": b"old"} and listing(tmp_path) == ["out"]


def test_a_directory_taking_the_target_mid_swap_loses_nothing(tmp_path, monkeypatch):
    # Two renames, overwrite=True: someone else creates `out` between them. Neither their
    # directory nor the old one may be deleted, now or by the next write.
    monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    target = old_directory(tmp_path)
    at_stage(monkeypatch, "aside", lambda: old_directory(tmp_path).joinpath("keep.txt").write_bytes(b"theirs"))
    with pytest.raises(FileExistsError) as caught:
        atomic_write_directory(target, FILES, overwrite=True)
    [kept] = [n for n in listing(tmp_path) if n.startswith(".out.kept-")]
    assert kept in " ".join(caught.value.__notes__)
    assert contents(tmp_path / kept) == {"keep.txt": b"old"} and contents(target) == {"keep.txt": b"theirs"}
    monkeypatch.setattr(atomic, "on_stage", None)
    atomic_write_directory(target, FILES, overwrite=True)
    assert contents(tmp_path / kept) == {"keep.txt": b"old"}  # never removed automatically


# ---- overwrite=False never replaces ---------------------------------------------------------


@pytest.mark.parametrize("appears", ["empty folder", "folder", "file"])
def test_target_appearing_during_the_write_is_never_replaced(tmp_path, monkeypatch, appears):
    target = tmp_path / "out"

    def create():
        if appears == "file":
            target.write_bytes(b"theirs")
        else:
            target.mkdir()
            if appears == "folder":
                (target / "theirs.txt").write_bytes(b"theirs")

    at_stage(monkeypatch, "built", create)
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        atomic_write_directory(target, FILES)
    if appears == "file":
        assert target.read_bytes() == b"theirs"
    else:
        assert contents(target) == ({} if appears == "empty folder" else {"theirs.txt": b"theirs"})
    assert listing(tmp_path) == ["out"]


def test_rename_noreplace_without_renameat2_refuses_what_has_content(tmp_path, monkeypatch):
    monkeypatch.setattr(filesystem, "_libc_renameat2", lambda: None)
    source = old_directory(tmp_path, "source")
    for existing in (old_directory(tmp_path, "folder"), tmp_path / "file"):
        if not existing.exists():
            existing.write_bytes(b"x")
        with pytest.raises(FileExistsError):
            filesystem.rename_noreplace(source, existing)
    filesystem.rename_noreplace(source, tmp_path / "new")
    assert contents(tmp_path / "new") == {"keep.txt": b"old"}


def test_overwrite_true_replaces_a_target_appearing_during_the_write(tmp_path, monkeypatch, swap):
    target = tmp_path / "out"
    at_stage(monkeypatch, "built", lambda: old_directory(tmp_path))
    atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == FILES and listing(tmp_path) == ["out"]


# ---- the lock ---------------------------------------------------------------------------------


def test_second_writer_is_refused_naming_the_lock_and_the_pid(tmp_path):
    target = old_directory(tmp_path)
    with write_lock(target) as lock:
        assert lock == tmp_path / ".out.lock"
        with pytest.raises(DirectoryLockedError, match=rf"process {os.getpid()}, which holds .*\.out\.lock") as caught:
            atomic_write_directory(target, FILES, overwrite=True)
        assert (caught.value.lock, caught.value.pid) == (lock, os.getpid())
        with pytest.raises(DirectoryLockedError):
            atomic_write_directory(tmp_path / "out", FILES, overwrite=True)  # however the path is spelled
        assert contents(target) == {"keep.txt": b"old"}
    assert listing(tmp_path) == ["out"]  # the lock file goes with the lock


def test_concurrent_writers_one_wins_the_other_fails_cleanly(tmp_path):
    target = old_directory(tmp_path)
    building, release = threading.Event(), threading.Event()
    errors = []

    def slow_finish(_):
        building.set()
        release.wait(10)
        return {}

    def first():
        try:
            atomic_write_directory(target, FILES, overwrite=True, finish=slow_finish)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=first)
    thread.start()
    assert building.wait(10)
    with pytest.raises(DirectoryLockedError, match="being written"):
        atomic_write_directory(target, {"other": b"x"}, overwrite=True)
    release.set()
    thread.join(10)
    assert not errors and contents(target) == FILES and listing(tmp_path) == ["out"]


def test_lock_file_of_a_killed_writer_does_not_block(tmp_path):
    target = old_directory(tmp_path)
    (tmp_path / ".out.lock").write_text(f"{dead_pid()}\n")  # flock died with its holder
    atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == FILES and listing(tmp_path) == ["out"]


# ---- debris of dead writers and interrupted swaps --------------------------------------------


def test_stale_temporaries_are_removed_by_the_next_write(tmp_path, swap):
    target = old_directory(tmp_path)
    pid = dead_pid()
    for name in (f".out.tmp-{pid}-0123abcd", f".out.old-{pid}-89abcdef", ".out.tmp-deadbeef"):  # last: older naming
        old_directory(tmp_path, name)
    (tmp_path / f".out.tmp-{pid}-00000000").write_bytes(b"half")
    unrelated = [".other.tmp-1-0123abcd", ".out.tmp-x", "out.tmp-1-0123abcd", ".out.kept-1-0123abcd"]
    for name in unrelated:
        (tmp_path / name).write_bytes(b"not ours")
    atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == FILES
    assert listing(tmp_path) == sorted(["out", *unrelated])


def test_stale_file_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "f.bin"
    dead, alive = f".f.bin.tmp-{dead_pid()}-0123abcd", f".f.bin.tmp-{os.getppid()}-0123abcd"
    for name in (dead, alive):
        (tmp_path / name).write_bytes(b"half")
    atomic_write_bytes(target, b"new")
    assert listing(tmp_path) == sorted(["f.bin", alive])  # a running writer's temporary stays


def interrupted_swap(tmp_path):
    """What a writer killed between its two renames leaves: no target, the old one aside."""
    old_directory(tmp_path, f".out.old-{dead_pid()}-0123abcd")
    (tmp_path / ".out.lock").write_text("1\n")
    return tmp_path / "out"


def test_interrupted_swap_is_recovered_by_the_next_write(tmp_path, swap):
    target = interrupted_swap(tmp_path)
    with pytest.raises(FileExistsError):  # recovered first, so there is something not to replace
        atomic_write_directory(target, FILES)
    assert contents(target) == {"keep.txt": b"old"} and listing(tmp_path) == ["out"]
    (tmp_path / "again").mkdir()
    target = interrupted_swap(tmp_path / "again")
    atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == FILES and listing(target.parent) == ["out"]


def test_interrupted_swap_is_recovered_for_a_reader(tmp_path):
    assert recover_directory(tmp_path / "out") is False  # nothing to do
    target = interrupted_swap(tmp_path)
    with write_lock(target):  # a writer is at work: do not touch its files
        with pytest.raises(DirectoryLockedError):
            recover_directory(target)
    assert recover_directory(target) is True
    assert contents(target) == {"keep.txt": b"old"} and listing(tmp_path) == ["out"]
    assert recover_directory(target) is False


def test_ambiguous_interrupted_swap_is_reported_not_guessed(tmp_path):
    for name in (".out.old-1-0123abcd", ".out.old-2-0123abcd"):
        old_directory(tmp_path, name)
    for attempt in (lambda: recover_directory(tmp_path / "out"),
                    lambda: atomic_write_directory(tmp_path / "out", FILES, overwrite=True)):
        with pytest.raises(InterruptedWriteError, match=r"\.out\.old-1-0123abcd, \.out\.old-2-0123abcd"):
            attempt()
    assert listing(tmp_path) == [".out.old-1-0123abcd", ".out.old-2-0123abcd"]


# ---- what else a directory write does ---------------------------------------------------------


def test_keep_others_carries_other_entries_as_hard_links(tmp_path, swap):
    target = old_directory(tmp_path)
    (target / "config.json").write_bytes(b"old config")
    (target / "sub").mkdir()
    (target / "sub" / "big.bin").write_bytes(b"checkpoint")
    os.symlink("keep.txt", target / "link")
    inode = (target / "sub" / "big.bin").stat().st_ino
    atomic_write_directory(target, FILES, overwrite=True, keep_others=True)
    assert contents(target / "sub") == {"big.bin": b"checkpoint"}
    assert (target / "sub" / "big.bin").stat().st_ino == inode  # linked, not copied
    assert os.readlink(target / "link") == "keep.txt" and (target / "keep.txt").read_bytes() == b"old"
    assert (target / "config.json").read_bytes() == FILES["config.json"]  # named files are replaced
    assert listing(tmp_path) == ["out"]


def test_symlinked_target_writes_its_destination(tmp_path, swap):
    real = old_directory(tmp_path, "real")
    os.symlink("real", tmp_path / "out")
    atomic_write_directory(tmp_path / "out", FILES, overwrite=True)
    assert os.readlink(tmp_path / "out") == "real" and contents(real) == FILES
    assert listing(tmp_path) == ["out", "real"]


def test_working_directory_is_not_replaced(tmp_path, monkeypatch):
    target = old_directory(tmp_path)
    monkeypatch.chdir(target)
    with pytest.raises(ValueError, match="current working directory"):
        atomic_write_directory(".", FILES, overwrite=True)
    assert contents(target) == {"keep.txt": b"old"} and listing(tmp_path) == ["out"]


def test_mount_point_is_not_replaced(tmp_path, monkeypatch):
    target = old_directory(tmp_path)
    real = os.path.ismount
    monkeypatch.setattr(atomic.os.path, "ismount", lambda path: os.fspath(path) == str(target) or real(path))
    with pytest.raises(ValueError, match="mount point"):  # renaming it would fail with EBUSY
        atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == {"keep.txt": b"old"} and listing(tmp_path) == ["out"]
