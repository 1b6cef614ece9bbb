"""core/atomic.py on real files: a write lands whole or not at all, and leaves no temporaries.

Failures are injected by raising from the writer/finish callbacks or by wrapping ``os.replace``
(the module calls it through the shared ``os`` module); the filesystem itself is real.
"""

import os
import stat

import pytest

from lightning_compress.core import atomic
from lightning_compress.core.atomic import atomic_write, atomic_write_bytes, atomic_write_directory


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


def test_overwrite_replaces_whole_directory_and_leaves_nothing_temporary(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"stale")  # must not survive: replaced, not merged
    (target / "config.json").write_bytes(b"old")
    atomic_write_directory(target, FILES, overwrite=True)
    assert contents(target) == FILES
    assert listing(tmp_path) == ["out"]  # neither .out.tmp-* nor .out.old-* left


@pytest.mark.parametrize("error", [ValueError("finish failed"), KeyboardInterrupt()])
def test_failure_while_building_keeps_old_directory(tmp_path, error):
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
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"old")
    fail_replace_into(monkeypatch, target, error)
    with pytest.raises(type(error)):
        atomic_write_directory(target, FILES, overwrite=True)
    # The old one had already been moved aside when the rename failed; it is back in place.
    assert contents(target) == {"keep.txt": b"old"}
    assert listing(tmp_path) == ["out"]
