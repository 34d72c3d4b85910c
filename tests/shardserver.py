"""A real HTTP server on 127.0.0.1 for the remote-data tests: Python's http.server in a thread,
serving a folder of converted splits, with range requests (`Range: bytes=a-b` answered 206, or 416
past the file's end; `honour_ranges = False` answers them with the whole file, as a server without
range support does), and faults to order: a connection cut mid-file, or a server that sends the
headers and a few bytes and then goes silent."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import threading
from collections import Counter
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: "ShardServer"

    def log_message(self, *args) -> None:  # quiet: the tests count requests instead
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        ranged = self.headers.get("Range")
        with self.server.lock:
            self.server.gets[name] += 1
            if ranged is not None:
                self.server.ranges[name] += 1
            cut = self.server.cuts.pop(name, None)
            stall = self.server.stalls.get(name)
            if stall is not None and self.server.stall_times[name] > 0:
                self.server.stall_times[name] -= 1
            else:
                stall = None
        path = Path(self.directory) / name
        span = None
        if ranged is not None and self.server.honour_ranges and path.is_file():
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            size = path.stat().st_size
            if int(first) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            span = (int(first), min(int(last) if last else size - 1, size - 1))
        if stall is not None:
            self._send_start(name, stall, span)
            self.server.closing.wait(600)  # silent, the connection open, until the server shuts down
            self.close_connection = True
            return
        if cut is None:
            if span is None:
                return super().do_GET()
            return self._send_start(name, None, span)
        self._send_start(name, cut, span)
        self.connection.shutdown(socket.SHUT_RDWR)  # the rest never comes: curl exits 18
        self.close_connection = True

    def _send_start(self, name: str, count: int | None, span: tuple[int, int] | None = None) -> None:
        """A 200 with the file's full length as Content-Length (a 206 with the span's, for a range
        request), and only the first `count` bytes of it (all, for None)."""
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200 if span is None else 206)
        if span is not None:
            self.send_header("Content-Range", f"bytes {span[0]}-{span[1]}/{len(data)}")
            data = data[span[0]: span[1] + 1]
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:count])
        self.wfile.flush()


class ShardServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
        self.lock = threading.Lock()
        self.gets: Counter = Counter()
        self.ranges: Counter = Counter()
        """Of the GETs, those with a Range header."""
        self.honour_ranges = True
        self.cuts: dict[str, int] = {}
        self.stalls: dict[str, int] = {}
        self.stall_times: Counter = Counter()
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stall(self, name: str, at: int, times: int = 1) -> None:
        """The next `times` GETs of `name` send its full length (or the range's) as Content-Length,
        then `at` bytes, then nothing, the connection left open."""
        with self.lock:
            self.stalls[name], self.stall_times[name] = at, times

    def cut_once(self, name: str, at: int) -> None:
        """The next GET of `name` sends its full length (or the range's) as Content-Length, then `at`
        bytes, then hangs up."""
        with self.lock:
            self.cuts[name] = at


@contextlib.contextmanager
def serving(folder: Path):
    """A ShardServer on a free port of 127.0.0.1 for the `with` block."""
    server = ShardServer(folder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()
