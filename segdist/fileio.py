"""Atomic writes: a temporary file beside the target, fsync, then `os.replace`; a folder of files
the same way (`atomic_folder`, which `check_new_folder` checks for first). And the one check that a
folder takes files before a command starts writing (`unwritable`, `check_writable`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from segdist.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


class AtomicFile:
    """A file written piece by piece that appears whole or not at all: bytes go to a temporary
    file beside `path` (its name unique to this process and call, so several writers of the same
    path never share one); `commit()` fsyncs and renames it into place, `discard()` removes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        Path(self._tmp).unlink(missing_ok=True)


def unwritable(folder: str | os.PathLike, create: bool = False) -> str | None:
    """Why no file can be written into `folder`, or None when one can. `folder` must be an existing
    folder; with `create`, a folder that does not exist yet is judged by the nearest existing one
    above it (where it would be created). The test is a real one: a temporary probe file is made
    there and removed at once, so nothing is left behind. The reason is a few words to put in a
    message: "<path> does not exist", "<path> is a file", or the OSError's own ("Permission
    denied", "Read-only file system")."""
    existing = Path(folder).absolute()
    if create:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
    if not existing.exists():
        return f"{existing} does not exist"
    if not existing.is_dir():
        return f"{existing} is a file"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".segdist-probe-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_writable(folder: str | os.PathLike, what: str, create: bool = False) -> None:
    """`unwritable` as a one-line `UserError` naming `what` (the recipe key or option that gave
    `folder`) and the folder as given: "train.run_dir runs/a is not writable (Permission denied);
    choose another folder"."""
    reason = unwritable(folder, create)
    if reason is not None:
        raise UserError(f"{what} {folder} is not writable ({reason}); choose another folder")


def check_new_folder(folder: str | os.PathLike, what: str) -> None:
    """`folder` can become a folder that `atomic_folder` writes: it is not there yet, or an empty
    folder, in an existing folder that takes files; else a one-line `UserError` naming `what` (the
    option that gave it) and the folder as given. Anything already in it is refused, never replaced."""
    path = Path(folder)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir())
        if found:
            more = f" and {len(found) - 1} more" if len(found) > 1 else ""
            raise UserError(f"{what} {folder} is not empty (it holds {found[0]!r}{more}): give a new or empty folder; "
                            "nothing in it is overwritten")
    elif path.exists():
        raise UserError(f"{what} {folder} is a file: give a new or empty folder")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UserError(f"{what} {folder}: its parent folder {parent} does not exist; create it first")
    check_writable(parent, what)


@contextmanager
def atomic_folder(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """A folder that appears whole or not at all. The block writes its files into a temporary folder
    beside `folder` (yielded); when it ends without an error every file is fsynced and the temporary
    folder renamed to `folder`, which must not exist or be empty (`check_new_folder`): a rename onto
    a folder that holds files fails, so a folder filled meanwhile is a `UserError` naming `what`, and
    is left as it is. On any error the temporary folder is removed."""
    path = Path(folder).absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                fsync_path(item)
                os.chmod(item, 0o644)  # as atomic_write_bytes leaves a file; some writers make theirs 0o600
        fsync_path(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would keep others from reading a folder made to be shared
        try:
            os.replace(tmp, path)
        except OSError as exc:  # ENOTEMPTY, EEXIST, ENOTDIR: something arrived at `folder` meanwhile
            raise UserError(f"{what} {folder} was filled while it was being written ({exc.strerror}): nothing in it "
                            "was overwritten; give a new or empty folder") from None
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file, or a folder's entries (what makes a rename in it durable), to disk. A
    folder whose filesystem cannot fsync folders (some network filesystems, Windows) is passed over."""
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)
