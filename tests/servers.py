"""Local servers on 127.0.0.1 for the remote-source and fetch tests and for benchmarks/fetch_bench.py.

- ``serve_http(root)``: Python's stock http.server (HTML directory listings, no Range): what a plain
  mirror looks like.
- ``serve_webdav(root)``: wsgidav on cheroot, anonymous read, PROPFIND listings (the RFB's Nextcloud share).
- ``CuttingServer(root)``: files with HTTP Range (``bytes=a-b``, ``bytes=a-``), ETags and HTML listings,
  that drops the connection mid-body on demand (``cut_next``: the next N GETs of a file send half their
  body; ``cut_at``: every GET covering an absolute offset stops there), as a broken network does.

Each returns (base URL ending in "/", stop).
"""
from __future__ import annotations

import functools
import html
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def serve_http(root: Path) -> Tuple[str, Callable[[], None]]:
    """The stock HTTP server over ``root`` (HTML listings, whole files only)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
    return f"http://127.0.0.1:{server.server_address[1]}/", stop


def serve_webdav(root: Path, threads: int = 10) -> Tuple[str, Callable[[], None]]:
    """``root`` as a WebDAV share (wsgidav on cheroot, anonymous read access)."""
    from cheroot import wsgi
    from wsgidav.wsgidav_app import WsgiDAVApp

    app = WsgiDAVApp({"provider_mapping": {"/": str(root)}, "simple_dc": {"user_mapping": {"*": True}},
                      "verbose": 0, "logging": {"enable": False, "enable_loggers": []},
                      "property_manager": True, "lock_storage": True})
    server = wsgi.Server(("127.0.0.1", 0), app, numthreads=threads)
    server.prepare()
    threading.Thread(target=server.serve, daemon=True).start()
    return f"http://127.0.0.1:{server.bind_addr[1]}/", server.stop


class CuttingServer:
    """A ranged HTTP file server whose connections break where the test says (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cut_next: Dict[str, int] = {}  # file name -> GETs left that send half their body, then drop
        self.cut_at: Dict[str, int] = {}  # file name -> absolute offset no GET gets past (drops there)
        self.gets: List[Tuple[str, Optional[str]]] = []  # (file name, Range header) of every GET
        self.cuts = 0  # connections dropped so far
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _cut_point(self, name: str, start: int, end: int) -> Optional[int]:
        """Where this GET of [start, end) stops, as an absolute offset; None: it completes."""
        with self._lock:
            at = self.cut_at.get(name)
            if at is not None and start <= at < end:
                self.cuts += 1
                return at
            if self.cut_next.get(name, 0) > 0:
                self.cut_next[name] -= 1
                self.cuts += 1
                return start + (end - start) // 2
        return None

    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _send(self, status: int, headers: Dict[str, str], data: bytes = b"") -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if data:
                    self.wfile.write(data)

            def _serve(self, body: bool) -> None:
                path = server.root / self.path.split("?")[0].lstrip("/")
                if path.is_dir():
                    links = [(p.name + ("/" if p.is_dir() else ""), p.name) for p in sorted(path.iterdir())]
                    page = "".join(f"<a href='{html.escape(h)}'>{html.escape(n)}</a><br>" for h, n in links)
                    data = f"<html><body>{page}</body></html>".encode()
                    self._send(200, {"Content-Type": "text/html", "Content-Length": str(len(data))},
                               data if body else b"")
                    return
                if not path.is_file():
                    self._send(404, {"Content-Length": "0"})
                    return
                data = path.read_bytes()
                tag = {"ETag": f'"{len(data)}-{path.stat().st_mtime_ns}"', "Accept-Ranges": "bytes"}
                if not body:
                    self._send(200, {"Content-Length": str(len(data)), **tag})
                    return
                rng = self.headers.get("Range")
                server.gets.append((path.name, rng))
                m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
                start, end, status = 0, len(data), 200
                if m:
                    start = int(m.group(1))
                    end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
                    status = 206
                    tag["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                self._send(status, {"Content-Length": str(end - start), **tag})
                cut = server._cut_point(path.name, start, end)
                if cut is None:
                    self.wfile.write(data[start:end])
                    return
                self.wfile.write(data[start:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
                self.close_connection = True

        return Handler
