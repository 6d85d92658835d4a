"""A real HTTP server on 127.0.0.1 (random port) serving a zoo folder, for the download
tests: byte ranges, a request log, and faults on demand (cut a transfer, ignore ranges,
slow down)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ZooServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.log: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut: dict[str, int] = {}  # path -> bytes sent before closing, once
        self.ranges = True
        self.delay = 0.0  # seconds per 64 KiB chunk
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                server._get(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of every GET of ``path`` (None: a whole-file request)."""
        with self._lock:
            return [r for p, r in self.log if p == path]

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0].lstrip("/")
        rng = h.headers.get("Range")
        with self._lock:
            self.log.append((path, rng))
            cut = self.cut.pop(path, None)
        f = (self.root / path).resolve()
        if not f.is_file() or self.root.resolve() not in f.parents:
            h.send_error(404)
            return
        data = f.read_bytes()
        start = 0
        if rng and self.ranges and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        h.end_headers()
        body = data[start:] if cut is None else data[start:start + cut]
        for i in range(0, len(body), 1 << 16):
            h.wfile.write(body[i:i + (1 << 16)])
            if self.delay:
                time.sleep(self.delay)
        if cut is not None:
            h.close_connection = True

    def __enter__(self) -> ZooServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
