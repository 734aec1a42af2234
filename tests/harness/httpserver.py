"""A real HTTP file server with Range support, and faults on demand, for download tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    cut_after: int | None = None  # close the connection after this many body bytes (once)
    cut_always: int | None = None  # ... after this many on every request: never completes
    hang_s: float = 0.0  # wait this long before answering (a server that hangs)
    ignore_range: bool = False  # answer 200 with the whole file even when asked for a range
    requests: list[str] = field(default_factory=list)  # "GET /x bytes=N-" for each request


def make_handler(root: Path, faults: Faults) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            path = root / self.path.lstrip("/")
            wanted = self.headers.get("Range")
            faults.requests.append(f"GET {self.path} {wanted or ''}".strip())
            if faults.hang_s:
                time.sleep(faults.hang_s)
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            if wanted and not faults.ignore_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if faults.cut_after is not None or faults.cut_always is not None:
                cut, faults.cut_after = faults.cut_after or faults.cut_always or 0, None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(2)  # the connection drops mid-file
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serve(root: Path) -> Iterator[tuple[str, Faults]]:
    faults = Faults()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(root, faults))
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
