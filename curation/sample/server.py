"""Serves a generated sample web on loopback with the HTTP behaviour its truth names per URL.

One threaded HTTP server per host in the manifest (127.0.0.1, 127.0.0.2, …), all on the manifest's
port. Behaviours are listed in `curation.sample.web.HTTP_BEHAVIOURS` (and, for a web generated with
consent planting, `curation.sample.consent.CONSENT_BEHAVIOURS`, with the manifest's `robots` and
`redirects`); this module is their only implementation. /robots.txt is a 404 unless the manifest plants
one. Every request is counted per (host, path) so tests can prove what was (not) fetched.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import pyarrow.parquet as pq

from curation.io import read_json
from curation.sample.consent import TDM_HEADERS
from curation.sample.web import SLOW_SECONDS

CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
REDIRECT_HOPS = 2
LOOP_PREFIX = "/_loop/"
HOP_PREFIX = "/_hop/"


@dataclass(frozen=True)
class Route:
    behaviour: str
    file: Path | None
    fmt: str | None


def _key(host: str, path: str) -> tuple[str, str]:
    return host, unquote(path)


def load_routes(root: Path) -> dict[tuple[str, str], Route]:
    """(host, unquoted path) -> Route, from the sample web's truth table."""
    table = pq.read_table(root / "truth.parquet", columns=["url", "http_behavior", "file", "format"])
    routes: dict[tuple[str, str], Route] = {}
    for row in table.to_pylist():
        parts = urlsplit(row["url"])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            continue
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        file = root / row["file"] if row["file"] else None
        routes[_key(parts.hostname, path)] = Route(row["http_behavior"], file, row["format"])
    return routes


class SampleWebServer:
    """The running servers; use `serve_sample_web` to start and stop them."""

    def __init__(self, root: Path, port: int | None = None, hosts: tuple[str, ...] | None = None) -> None:
        manifest: dict[str, Any] = read_json(str(root / "manifest.json"))
        self.root = root
        self.port = int(port if port is not None else manifest["port"])
        self.hosts = tuple(hosts if hosts is not None else manifest["hosts"])
        self.routes = load_routes(root)
        self.robots: dict[str, dict[str, Any]] = manifest.get("robots", {})  # host -> status, file, location
        self.redirects: dict[tuple[str, str], str] = {}  # planted cross-host redirects: (host, path) -> Location
        for source, target in manifest.get("redirects", {}).items():
            src, dst = urlsplit(source), urlsplit(target)
            self.redirects[_key(str(src.hostname), src.path)] = target
            origin = self.routes[_key(str(src.hostname), src.path)]
            self.routes[_key(str(dst.hostname), dst.path)] = Route("ok", origin.file, origin.fmt)
        self.tokens = {hashlib.sha1(f"{h}{p}".encode()).hexdigest()[:16]: (h, p) for h, p in self.routes}
        self.hits: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    def record(self, host: str, path: str) -> None:
        with self._lock:
            self.hits[(host, path)] += 1

    @property
    def total_hits(self) -> int:
        with self._lock:
            return sum(self.hits.values())

    def start(self) -> None:
        handler = _make_handler(self)
        for host in self.hosts:
            try:
                server = ThreadingHTTPServer((host, self.port), handler)
            except OSError as exc:
                self.stop()
                raise OSError(
                    f"cannot serve the sample web on {host}:{self.port}: {exc}. Is another "
                    f"server running? Pick another port with --port."
                ) from exc
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, name=f"sample-web-{host}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()
        self._threads.clear()


def _make_handler(web: SampleWebServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `web` (its routes, redirect tokens and hit counter)."""

    class Handler(_SampleWebHandler):
        pass

    Handler.web = web
    return Handler


class _SampleWebHandler(BaseHTTPRequestHandler):
    """Answers each request from the bound sample web's routes, with the route's planted behaviour."""

    server_version = "sample-web/1"
    protocol_version = "HTTP/1.1"
    web: ClassVar[SampleWebServer]  # bound per server by `_make_handler`

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `hits` instead
        return

    def _host(self) -> str:
        address = self.server.server_address
        return str(address[0] if isinstance(address, tuple) else address)

    def _send(
        self,
        status: int,
        body: bytes = b"",
        ctype: str = "text/plain",
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        host, path = self._host(), self.path
        self.web.record(host, path)
        if path.startswith(HOP_PREFIX):
            self._hop(path)
            return
        if path == "/robots.txt" and host in self.web.robots:
            self._robots(self.web.robots[host])
            return
        if path.startswith(LOOP_PREFIX):
            n = int(path[len(LOOP_PREFIX) :].split("/", 1)[0] or 0)
            self._send(302, headers={"Location": f"{LOOP_PREFIX}{n + 1}"})
            return
        route = self.web.routes.get(_key(host, path))
        if route is None:
            self._send(404, b"not found")
            return
        self._serve(host, path, route)

    def _robots(self, planted: dict[str, Any]) -> None:
        body = (self.web.root / planted["file"]).read_bytes()
        location = planted.get("location")
        self._send(int(planted["status"]), body, headers={"Location": location} if location else None)

    def _hop(self, path: str) -> None:
        _, _, n, token = path.split("/", 3)
        if token not in self.web.tokens:
            self._send(404, b"unknown hop")
            return
        h, p = self.web.tokens[token]
        if int(n) > 1:
            self._send(301, headers={"Location": f"{HOP_PREFIX}{int(n) - 1}/{token}"})
            return
        self._serve(h, p, self.web.routes[(h, p)], final=True)

    def _serve(self, host: str, path: str, route: Route, final: bool = False) -> None:
        """Answer `route`: an error or redirect when its behaviour says so, else its file the planted way."""
        redirect = self.web.redirects.get(_key(host, path))
        if redirect is not None and not final:
            self._send(302, headers={"Location": redirect})
            return
        answer = _answer_without_file(route.behaviour, host, path, final)
        if answer is not None:
            status, body, headers = answer
            self._send(status, body, headers=headers)
            return
        if route.file is None:
            self._send(404, b"not found")
            return
        data = route.file.read_bytes()
        ctype, headers = _file_headers(route.behaviour, route.fmt)
        if route.behaviour == "slow":
            time.sleep(SLOW_SECONDS)
        if route.behaviour == "truncated":
            # Promise the whole file, send half, then close: the client sees an incomplete body.
            self.close_connection = True
            self._send(200, data[: len(data) // 2], ctype, headers, length=len(data))
            return
        self._send(200, data, ctype, headers)


def _answer_without_file(
    behaviour: str, host: str, path: str, final: bool
) -> tuple[int, bytes, dict[str, str]] | None:
    """(status, body, headers) for a behaviour answered without the file (errors, redirects), else None.

    `final` is set on the last hop of a redirect chain, where a "redirect" route serves its file.
    """
    if behaviour == "not_found":
        return 404, b"File not found", {}
    if behaviour == "server_error":
        return 500, b"Internal Server Error", {}
    if behaviour == "redirect_loop":
        return 302, b"", {"Location": f"{LOOP_PREFIX}0"}
    if behaviour == "redirect" and not final:
        token = hashlib.sha1(f"{host}{unquote(path)}".encode()).hexdigest()[:16]
        return 302, b"", {"Location": f"{HOP_PREFIX}{REDIRECT_HOPS}/{token}"}
    return None


def _file_headers(behaviour: str, fmt: str | None) -> tuple[str, dict[str, str]]:
    """(Content-Type, extra headers) for serving a file of format `fmt` with `behaviour`."""
    ctype = CONTENT_TYPES.get(fmt or "", "application/octet-stream")
    headers: dict[str, str] = {}
    if behaviour == "x_robots_noai":
        headers["X-Robots-Tag"] = "noai, noimageai"
    elif behaviour == "x_robots_nofollow":
        headers["X-Robots-Tag"] = "nofollow"
    elif behaviour == "wrong_content_type":
        ctype = "text/plain"
    elif behaviour in ("not_an_image", "corrupt"):
        ctype = "image/jpeg"
    elif behaviour in TDM_HEADERS:
        headers["tdm-reservation"] = TDM_HEADERS[behaviour]
    return ctype, headers


@contextmanager
def serve_sample_web(
    root: str | Path, port: int | None = None, hosts: tuple[str, ...] | None = None
) -> Iterator[SampleWebServer]:
    """Serve the sample web at `root` for the duration of the block."""
    web = SampleWebServer(Path(root), port, hosts)
    web.start()
    try:
        yield web
    finally:
        web.stop()


def serve_forever(root: str | Path, port: int | None = None) -> None:
    """Serve until interrupted (the `curation serve-sample-web` command)."""
    with serve_sample_web(root, port) as web:
        print(
            f"serving the sample web from {root} on " + ", ".join(f"http://{h}:{web.port}/" for h in web.hosts),
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
