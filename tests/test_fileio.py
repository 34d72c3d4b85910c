"""Atomic writes: the target is the old file or the whole new one, never a part; no temp file left."""

import json
import os

import pytest

from segdist.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_path


def test_writes_creates_folders_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "metrics.json"
    atomic_write_json(target, {"miou": 0.5})
    assert json.loads(target.read_text()) == {"miou": 0.5} and target.read_text().endswith("\n")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_object_json_cannot_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_file_appears_whole_on_commit_and_never_on_discard(tmp_path):
    from segdist.fileio import AtomicFile

    target = tmp_path / "cache" / "a.tar"
    a, b = AtomicFile(target), AtomicFile(target)  # two writers of one path: two temporary files
    a.write(b"12")
    b.write(b"12")
    assert not target.exists() and len(list(target.parent.iterdir())) == 2
    a.write(b"34")
    a.commit()
    assert target.read_bytes() == b"1234"
    b.discard()
    assert [p.name for p in target.parent.iterdir()] == ["a.tar"]


def test_a_folder_is_writable_when_a_probe_file_can_be_made_there_and_none_is_left(tmp_path):
    from segdist.errors import UserError
    from segdist.fileio import check_writable, unwritable

    (tmp_path / "out").mkdir()
    assert unwritable(tmp_path / "out") is None and list((tmp_path / "out").iterdir()) == []
    # not there yet: judged by the folder it would be created in (create), else refused
    assert unwritable(tmp_path / "new" / "deeper", create=True) is None and not (tmp_path / "new").exists()
    assert unwritable(tmp_path / "new") == f"{tmp_path / 'new'} does not exist"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert unwritable(blocker / "run", create=True) == f"{blocker} is a file"
    assert unwritable(blocker) == f"{blocker} is a file"
    with pytest.raises(UserError) as caught:
        check_writable(blocker / "run", "train.run_dir", create=True)
    assert str(caught.value) == (f"train.run_dir {blocker / 'run'} is not writable ({blocker} is a file); "
                                 "choose another folder")
    check_writable(tmp_path / "out", "--report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "out"] and blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_folder_is_not_writable_and_says_why(tmp_path):
    from segdist.errors import UserError
    from segdist.fileio import check_writable, unwritable

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert unwritable(locked) == "Permission denied"
        assert unwritable(locked / "run", create=True) == "Permission denied"
        with pytest.raises(UserError, match=r"^--report .*locked/r is not writable \(Permission denied\)"):
            check_writable(locked / "r", "--report", create=True)
    finally:
        locked.chmod(0o755)


def test_the_reason_is_the_probes_own_error(tmp_path, monkeypatch):
    import tempfile

    from segdist.fileio import unwritable

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert unwritable(tmp_path) == "Read-only file system"
    assert unwritable(tmp_path / "a" / "b", create=True) == "Read-only file system"


def test_an_atomic_folder_appears_whole_and_never_on_an_error(tmp_path):
    from segdist.fileio import atomic_folder

    target = tmp_path / "model"
    with atomic_folder(target, "--out") as tmp:
        (tmp / "a.bin").write_bytes(b"12")
        os.chmod(tmp / "a.bin", 0o600)
        assert not target.exists() and tmp.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "a.bin").read_bytes() == b"12"
    assert oct(target.stat().st_mode & 0o777) == "0o755" and oct((target / "a.bin").stat().st_mode & 0o777) == "0o644"

    with pytest.raises(RuntimeError, match="broke"):
        with atomic_folder(tmp_path / "other", "--out") as tmp:
            (tmp / "a.bin").write_bytes(b"12")
            raise RuntimeError("broke")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_atomic_folder_takes_the_place_of_an_empty_one_but_never_of_files(tmp_path):
    from segdist.errors import UserError
    from segdist.fileio import atomic_folder

    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty", "--out") as tmp:
        (tmp / "a.bin").write_bytes(b"new")
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["a.bin"]

    target = tmp_path / "raced"
    with pytest.raises(UserError, match="--out .*raced was filled while it was being written"):
        with atomic_folder(target, "--out") as tmp:
            (tmp / "a.bin").write_bytes(b"new")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")  # someone else's file arrives meanwhile
    assert [p.name for p in target.iterdir()] == ["theirs.txt"] and (target / "theirs.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "raced"]


@pytest.mark.parametrize("setup,needle", [
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("x"), (p / "b.txt").write_text("x")),
     r"--out .*out is not empty \(it holds 'a.txt' and 1 more\): give a new or empty folder"),
    (lambda p: p.write_text("x"), "--out .*out is a file: give a new or empty folder"),
    (None, "--out .*out: its parent folder .*missing does not exist; create it first"),
])
def test_a_new_folder_is_new_or_empty_in_a_folder_that_exists(tmp_path, setup, needle):
    from segdist.errors import UserError
    from segdist.fileio import check_new_folder

    check_new_folder(tmp_path / "out", "--out")  # not there yet: fine
    (tmp_path / "empty").mkdir()
    check_new_folder(tmp_path / "empty", "--out")  # empty: fine
    target = tmp_path / "out" if setup else tmp_path / "missing" / "out"
    if setup:
        setup(target)
    with pytest.raises(UserError, match=needle):
        check_new_folder(target, "--out")


def test_fsync_path_flushes_a_file_or_a_folder_and_names_a_missing_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    fsync_path(tmp_path / "a.bin")
    fsync_path(tmp_path)  # a folder: what makes a rename in it durable
    with pytest.raises(FileNotFoundError):  # a file that is not there is an error, never passed over
        fsync_path(tmp_path / "gone")
