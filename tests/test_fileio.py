"""Atomic writes: the target is the old file or the whole new one, never a part; no temp file left."""

import json
import os

import pytest

from segdist.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text


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
