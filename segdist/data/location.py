"""Where a split's files live (`data.root`), and reading their bytes from there.

`data.root` is one of:
- a local folder (`data/cityscapes`, or `file:///data/cityscapes`);
- an `http://` or `https://` prefix: files are `<prefix>/<name>`, fetched by webdataset's `gopen`
  (which runs `curl`; curl's own configuration, e.g. `~/.netrc`, applies);
- a `pipe:` command template with `{name}`, e.g. `pipe:aws s3 cp s3://bucket/shards/{name} -`: the
  command writes the file to stdout (webdataset's `gopen`, run through the shell);
- any other `scheme://` URL (`s3://`, `gs://`, `az://`, ...), opened through fsspec when fsspec and
  the store's package (s3fs, gcsfs, adlfs) are installed: `pip install segdist[remote]` plus that one.

The manifest `<split>.json` is read from the same place as the shards.

Remote bytes go through `Fetch`, a file object that counts what it has handed on. When the
connection drops (curl exits non-zero, a pipe's command fails, fsspec raises an OSError), it waits
with exponential backoff, opens the file again and skips exactly the bytes already handed on, up to
`data.fetch_retries` times. So a retry never repeats or loses a byte, and the samples are those of
the local file. Over http(s) a read that brings no byte for `data.fetch_timeout` seconds (a server
that accepts, sends a little and goes silent) is broken off by curl itself and retried the same way,
so a silent server ends in one line, not in a hang that even a stop signal cannot end; a `pipe:`
command or an fsspec store goes by its own timeouts (e.g. `aws --cli-read-timeout`). A refusal (HTTP 4xx/5xx after curl's own retries, a missing object, denied access)
is not retried: it is one `UserError` naming the URL. `Fetch` hashes what it reads; a shard read
whole must match the manifest's sha256, or it is a `ShardError`.

With `data.cache_dir`, a remote shard read whole and matching its sha256 is kept there as
`<sha256>.tar` and read locally from then on. The name is the content's hash, so a shard converted
again is fetched again; each process writes its own temporary file and renames it into place, so
several ranks on one node can fill one cache.

Part of a file (one sample, read by position: segdist.data.sample.read_sample) is `read_range`:
over http(s) a range request (`curl -r`), through fsspec a seek; retried, refused and broken off
exactly as a whole file is, resuming at the byte where it broke off. A `pipe:` command cannot seek:
it needs `data.cache_dir` (`check_seekable`), where `ShardSource.ensure_cached` fetches the shard
whole once. A range read has no sha256 to check: a server that serves other bytes is caught only
where they do not decode.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

from segdist.errors import UserError
from segdist.fileio import AtomicFile

log = logging.getLogger("segdist")

KINDS = ("local", "http", "pipe", "fsspec")
BACKOFF_S = 0.5
"""The first retry waits this long; each further one twice as long, at most BACKOFF_MAX_S."""
BACKOFF_MAX_S = 30.0
CURL_HTTP_ERROR = 22
"""curl's exit status for an HTTP response >= 400 (gopen runs curl with -f)."""
CURL_STALLED = 28
"""curl's exit status when a transfer brought less than a byte a second for --speed-time seconds."""
_HTTP_REASONS = {401: "unauthorized: an authentication failure", 403: "forbidden: an authentication failure",
                 404: "not found"}


def root_kind(root: str | os.PathLike) -> str:
    """Which of KINDS `data.root` is."""
    text = str(root)
    if text.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(text).scheme if "://" in text else ""
    if scheme in ("", "file"):
        return "local"
    if scheme in ("http", "https"):
        return "http"
    return "fsspec"


def is_remote(root: str | os.PathLike) -> bool:
    return root_kind(root) != "local"


def local_root(root: str | os.PathLike) -> Path:
    """The folder of a local `data.root` (a `file://` URL's path)."""
    text = str(root)
    return Path(urlparse(text).path) if text.startswith("file://") else Path(text)


def address(root: str | os.PathLike, name: str) -> str:
    """The address of file `name` of a root: a path, a URL or a shell command."""
    kind, text = root_kind(root), str(root)
    if kind == "local":
        return str(local_root(root) / name)
    if kind == "pipe":
        if "{name}" not in text:
            raise UserError(f"data.root {text!r} is a pipe: command without {{name}}: write where the file "
                            "name goes, e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -'")
        return text.replace("{name}", name)
    return text.rstrip("/") + "/" + (quote(name) if kind == "http" else name)


@dataclass(frozen=True)
class ShardSource:
    """One shard to read: its root and file name, the manifest's sha256, and the cache to use."""

    root: str
    name: str
    sha256: str | None = None
    cache_dir: str | None = None
    retries: int = 5
    timeout: float = 60.0
    """Seconds an http(s) read may bring no bytes before it counts as broken off (data.fetch_timeout)."""

    @property
    def address(self) -> str:
        return address(self.root, self.name)

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    def cached(self) -> Path | None:
        """The cache's verified copy, if there is one."""
        if self.cache_dir is None or self.sha256 is None:
            return None
        path = Path(self.cache_dir) / f"{self.sha256}.tar"
        return path if path.is_file() else None

    def ensure_cached(self) -> Path:
        """The cache's verified copy, fetched whole through `Fetch` first when there is none yet
        (checked against the manifest's sha256 and committed into data.cache_dir). A fetch that
        brings other bytes raises ValueError saying why (nothing is kept); one that fails, a
        `UserError`. Needs `cache_dir` and `sha256`."""
        if self.cache_dir is None or self.sha256 is None:
            raise ValueError(f"{self.address}: ensure_cached needs a cache_dir and the manifest's sha256")
        path = self.cached()
        if path is not None:
            return path
        fetch = Fetch(self)
        try:
            problem = fetch.finish()
        finally:
            fetch.close()
        if problem is not None:
            raise ValueError(problem)
        return Path(self.cache_dir) / f"{self.sha256}.tar"

    def __str__(self) -> str:
        return self.address


# -- opening ------------------------------------------------------------------------------------
def check_seekable(root: str, cache_dir: str | None) -> None:
    """Part of a file of this root can be read: a `pipe:` command cannot seek, so without
    data.cache_dir (whole shards fetched once and read locally) it is a one-line `UserError`."""
    if root_kind(root) == "pipe" and cache_dir is None:
        raise UserError(f"data.root {root!r} is a pipe: command, which cannot read one sample of a shard: "
                        "set data.cache_dir (each shard is then fetched whole once, checked and read from there)")


def _open(root: str, name: str, timeout: float = 60.0, span: tuple[int, int] | None = None):
    """A fresh binary stream of a remote file; over http(s) one that ends in curl's exit status
    CURL_STALLED once no byte came for `timeout` seconds. `span` (first byte, last byte) asks for
    those bytes only: a range request over http(s), a seek through fsspec (which then reads on past
    the last byte: the caller stops there)."""
    kind, where = root_kind(root), address(root, name)
    if span is not None and kind not in ("http", "fsspec"):
        raise ValueError(f"{where}: a byte range is read over http(s) or fsspec only")
    if kind == "fsspec":
        try:
            import fsspec
        except ImportError:
            raise UserError(f"data.root {root} needs fsspec: pip install 'segdist[remote]' and the store's "
                            "package (s3fs, gcsfs or adlfs)") from None
        try:
            stream = fsspec.open(where, "rb").open()
        except ImportError as exc:
            raise UserError(f"data.root {root}: {exc}") from None
        if span is not None:
            stream.seek(span[0])
        return stream
    if kind == "http" and shutil.which("curl") is None:
        raise UserError(f"data.root {root}: webdataset reads http(s) through curl, which is not installed: "
                        "install curl (apt-get install curl)")
    from webdataset.gopen import Pipe, gopen

    if kind == "http":
        # webdataset's curl command, less its own retries (Fetch retries, resuming at the right byte)
        # and plus a stall limit: a server that accepts, sends a little and goes silent would
        # otherwise hold the read, and a stop signal with it, for good.
        ranged = ["-r", f"{span[0]}-{span[1]}"] if span is not None else []
        return Pipe(["curl", "--connect-timeout", "30", "--speed-limit", "1", "--speed-time",
                     str(max(1, round(timeout))), *ranged, "-f", "-s", "-L", where], mode="rb", bufsize=8192,
                    ignore_status=[141, 23])
    return gopen(where, "rb")


def http_status(url: str) -> int | None:
    """The status of a HEAD request through curl (following redirects), or None when no server answered."""
    try:
        done = subprocess.run(["curl", "-s", "-o", os.devnull, "-I", "-L", "--connect-timeout", "30",
                               "-w", "%{http_code}", url], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    code = done.stdout.strip()
    return int(code) if code.isdigit() and int(code) > 0 else None


def _refusal(root: str, name: str, exc: BaseException, status: int | None, code: int | None) -> str | None:
    """Why a failed open or read will not get better by retrying, or None when it might. `status`: the
    exit status of the reading command; `code`: the status of the HEAD request the caller made after
    curl's HTTP error (None when no server answered, or not asked)."""
    kind, where = root_kind(root), address(root, name)
    if kind == "http" and status == CURL_HTTP_ERROR:
        reason = _HTTP_REASONS.get(code, "refused") if code else "refused"
        return f"{where}: HTTP {code or 'error'} ({reason})"
    if kind == "fsspec" and isinstance(exc, (FileNotFoundError, PermissionError)):
        what = "not found" if isinstance(exc, FileNotFoundError) else "access denied: an authentication failure"
        return f"{where}: {what}"
    return None


class Fetch:
    """A remote file read front to back, reopened where it broke off; see the module docstring.
    `what` names the file in errors ("shard", "manifest"). With `length`, only the `length` bytes
    from byte `start` are read (`read_range`), never kept in the cache; fewer when the file ends
    first."""

    def __init__(self, source: ShardSource, what: str = "shard", start: int = 0, length: int | None = None) -> None:
        self.source, self.what = source, what
        self.start, self.length = start, length
        self.offset = 0
        """Bytes handed on (from `start`)."""
        self.failures = 0
        self.digest = hashlib.sha256()
        self._stream = None
        self._past_end = False  # a range request that began past the file's end (HTTP 416)
        whole = length is None and source.cache_dir is not None and source.sha256 is not None
        self._keep = AtomicFile(Path(source.cache_dir) / f"{source.sha256}.tar") if whole else None

    def __str__(self) -> str:
        return self.source.address

    def _reopen(self) -> None:
        if self.length is not None:  # a range: ask for what is left of it
            span = (self.start + self.offset, self.start + self.length - 1)
            self._stream = _open(self.source.root, self.source.name, self.source.timeout, span)
            return
        self._stream = _open(self.source.root, self.source.name, self.source.timeout)
        if self.offset and getattr(self._stream, "seekable", lambda: False)():
            self._stream.seek(self.offset)
            return
        left = self.offset
        while left:
            skipped = self._stream.read(min(left, 1 << 20))
            if not skipped:
                raise OSError(f"it ended after {self.offset - left} bytes, before the {self.offset} read already")
            left -= len(skipped)

    def _failed(self, exc: BaseException) -> None:
        status = getattr(self._stream, "status", None)
        self._drop()
        http = root_kind(self.source.root) == "http"
        code = http_status(self.source.address) if http and status == CURL_HTTP_ERROR else None
        if self.length is not None and code is not None and code < 400:
            # The file is there, the range was refused (HTTP 416): it starts past the file's end.
            self._past_end = True
            return
        refusal = _refusal(self.source.root, self.source.name, exc, status, code)
        if refusal is not None:
            raise UserError(f"{self.what} {refusal}; check data.root and the credentials") from None
        self.failures += 1
        if http and status == CURL_STALLED:
            why = f"no bytes for {self.source.timeout:g} s, data.fetch_timeout"
        elif status is not None:
            why = f"{'curl' if http else 'the command'} exited with {status}"
        else:
            why = str(exc)
        at = self.start + self.offset
        if self.failures > self.source.retries:
            raise UserError(
                f"{self.what} {self.source.address}: reading failed {self.failures} times, the last at byte "
                f"{at} ({why}); check data.root and the network, or raise data.fetch_retries"
            ) from None
        log.warning("%s %s: reading broke off at byte %d (%s); retry %d of %d", self.what, self.source.address,
                    at, why, self.failures, self.source.retries)
        time.sleep(min(BACKOFF_S * 2 ** (self.failures - 1), BACKOFF_MAX_S))

    def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a failed command's status: already being handled
                pass

    def _end_range(self) -> None:
        """The range is read: over http(s), a server that sends more than was asked for ignores range
        requests (it sent the file from its start), a one-line `UserError`."""
        stream = self._stream
        if stream is not None and root_kind(self.source.root) == "http":
            try:
                extra = stream.read(1)
            except (OSError, ValueError):
                extra = b""
            if extra:
                self.close()
                raise UserError(
                    f"{self.what} {self.source.address}: the server sent more than the {self.length} bytes asked "
                    f"for from byte {self.start}: it ignores HTTP range requests; set data.cache_dir to fetch "
                    "whole shards instead"
                )
        self._drop()

    def read(self, size: int = -1) -> bytes:
        if self.length is not None:
            left = self.length - self.offset
            if left <= 0 or self._past_end:
                self._end_range()
                return b""
            size = left if size < 0 else min(size, left)
        while True:
            try:
                if self._stream is None:
                    self._reopen()
                data = self._stream.read(size)
                if not data and size != 0:
                    # The end: webdataset's Pipe only reports a failed command once it is waited
                    # for, so a connection cut between two reads shows here, not as an error.
                    self._stream.close()
                    self._stream = None
                break
            except UserError:
                self.close()
                raise
            except (OSError, ValueError) as exc:
                self._failed(exc)
                if self._past_end:
                    data = b""
                    break
        self.offset += len(data)
        self.digest.update(data)
        if self._keep is not None:
            self._keep.write(data)
        return data

    def read_all(self) -> bytes:
        chunks = []
        while chunk := self.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def finish(self) -> str | None:
        """After the tar's end: read what follows it, then check the whole file's sha256 and keep the
        cache's copy. Returns why the file is not the manifest's (None when it is)."""
        while self.read(1 << 20):
            pass
        expected, got = self.source.sha256, self.digest.hexdigest()
        if expected is not None and got != expected:
            self.close()
            return f"its {self.offset} bytes have sha256 {got[:12]}..., the manifest says {expected[:12]}..."
        if self._keep is not None:
            self._keep.commit()
            self._keep = None
        return None

    def close(self) -> None:
        self._drop()
        if self._keep is not None:
            self._keep.discard()
            self._keep = None


def read_range(source: ShardSource, offset: int, size: int) -> bytes:
    """`size` bytes of a remote file from byte `offset`, fewer when the file ends first: over http(s)
    a range request (`curl -r`), through fsspec a seek; retried like a whole file (`Fetch`), resuming
    where it broke off. A `pipe:` root cannot seek (`check_seekable`); a server that ignores range
    requests is a `UserError` too. No sha256 is checked: it covers whole files only."""
    check_seekable(source.root, None)
    if size <= 0:
        return b""
    fetch = Fetch(source, start=offset, length=size)
    try:
        return fetch.read_all()
    finally:
        fetch.close()


def read_file(root: str | os.PathLike, name: str, what: str, retries: int = 5, timeout: float = 60.0) -> bytes | None:
    """The bytes of a small file (a manifest) of any root, or None when it is not there."""
    if not is_remote(root):
        path = local_root(root) / name
        return path.read_bytes() if path.is_file() else None
    fetch = Fetch(ShardSource(str(root), name, retries=retries, timeout=timeout), what)
    try:
        return fetch.read_all()
    finally:
        fetch.close()


# -- checks before training ---------------------------------------------------------------------
def _check_one(source: ShardSource) -> str | None:
    kind, where = root_kind(source.root), source.address
    if source.cached() is not None:
        return None
    if kind == "http":
        code = http_status(where)
        if code is None:
            return f"shard {where}: no server answered; check data.root and the network"
        if code >= 400:
            return (f"shard {where}: HTTP {code} ({_HTTP_REASONS.get(code, 'refused')}); "
                    "check data.root and the credentials")
    elif kind == "fsspec":
        import fsspec

        fs, path = fsspec.core.url_to_fs(where)
        try:
            if not fs.exists(path):
                return f"shard {where}: not found; check data.root"
        except PermissionError:
            return f"shard {where}: access denied (an authentication failure); check the credentials"
    return None


def check_sources(sources: list[ShardSource]) -> None:
    """Every remote shard is there (HTTP: a HEAD request each, 8 at a time; fsspec: `exists`), before
    anything is written. A `pipe:` command cannot be asked: its shards fail when they are read."""
    if not sources or root_kind(sources[0].root) in ("local", "pipe"):
        return
    with ThreadPoolExecutor(8) as pool:
        for problem in pool.map(_check_one, sources):
            if problem is not None:
                raise UserError(problem)
