"""Hostile HTTP servers against the downloader: each ends as a row with a status and a reason, in bounded
time and memory, and the good images of the same run still download.

One loopback server (127.0.0.1, allowed by an exact `host:port` allow-list entry, not by allowing
loopback) plays every hostile part; a second listener on another port of 127.0.0.1 and ::1 only counts
connections: redirects point at it under every loopback spelling, and it must count none. Two
img2dataset runs in one child process, so that the peak RSS of their worker processes can be read
(`RUSAGE_CHILDREN` of the child): the network cases, and a shard of large RGBA PNGs with 32 threads.
The in-process tests check the same guard rules directly, with every socket.connect audited.

Measured on 2 cores (workers' peak RSS over the 845 MB a worker takes to import its libraries): before
the fixes the trickling servers held their connections 18 s and their rows read `too_small` and
`success`, redirects to file:/gopher:/data: read `http_302`, the gzip body `not_an_image`, and the three
9400x9400 RGBA PNGs took +6418 MB (44 s); after, +893 MB (23 s). The network run stays at +14 MB.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from img2dataset.resizer import Resizer
from PIL import Image

from curation import records as R
from curation.download import DownloadConfig, GuardedResizer, flatten_alpha
from curation.netguard import (
    DeadlineExceeded,
    NetBlocked,
    NetPolicy,
    UnsupportedEncoding,
    build_guarded_opener,
)
from tests.test_curation.test_netguard import connects, noise_image  # noqa: F401  (a fixture, used by name)

REPO = Path(__file__).resolve().parents[2]
JPG = noise_image(320, 240, "JPEG", seed=11)
PNG = noise_image(200, 150, "PNG", seed=12)
TIMEOUT_S = 1.5  # per receive: five trickle gaps, so only the deadline can cut a trickle off
DEADLINE_S = 2.0  # per URL attempt
TRICKLE_GAP_S = 0.3  # under TIMEOUT_S: a per-receive timeout alone never fires
TRICKLE_BYTES = 60  # 18 s of trickling if nothing cuts it off
MAX_BODY = 2_000_000
GZIP_INFLATED = 1 << 30  # what the gzip bomb would inflate to
BIG_SIDE = 9400  # 88.4 Mpx: under the LAION pixel limit of 89,478,484


# --- the hostile server ------------------------------------------------------------------------------


def rgba_png(width: int, height: int) -> bytes:
    """A semi-transparent gradient RGBA PNG, every row the same (PNG 'Up' filter): ~350 KB at 9400x9400."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    x = np.arange(width)
    row = np.stack([x % 256, (x // 37) % 256, 255 - x % 256, (x * 7) % 256], axis=1).astype(np.uint8)
    comp = zlib.compressobj(9)
    up = b"\x02" + bytes(4 * width)  # filter 'Up' with zero differences: a copy of the row above
    idat = comp.compress(b"\x00" + row.tobytes()) + b"".join(comp.compress(up) for _ in range(height - 1))
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 6, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat + comp.flush())
            + chunk(b"IEND", b""))


def gzip_bomb(inflated: int) -> bytes:
    """A gzip body of ~1/1000 the size it inflates to: identical gzip members, concatenated (RFC 1952)."""
    member = gzip.compress(bytes(64 << 20), compresslevel=9)
    return member * (inflated // (64 << 20))


Behaviour = Callable[[BaseHTTPRequestHandler], None]


def serve(body: bytes, content_type: str = "image/jpeg", headers: dict[str, str] | None = None) -> Behaviour:
    def reply(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)
    return reply


def redirect(location: str, delay_s: float = 0.0) -> Behaviour:
    def reply(h: BaseHTTPRequestHandler) -> None:
        time.sleep(delay_s)
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return reply


def trickle_body(h: BaseHTTPRequestHandler) -> None:
    """Headers at once, then a byte every TRICKLE_GAP_S: each receive is quick, the body never ends."""
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.end_headers()  # no Content-Length: the body ends when the connection does
    for _ in range(TRICKLE_BYTES):
        h.wfile.write(b"\xff")
        time.sleep(TRICKLE_GAP_S)


def trickle_headers(h: BaseHTTPRequestHandler) -> None:
    """The status line, then one header trickled a byte at a time, then a small body."""
    h.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nX-Slow: ")
    for _ in range(TRICKLE_BYTES):
        h.wfile.write(b"a")
        time.sleep(TRICKLE_GAP_S)
    h.wfile.write(b"\r\nContent-Length: %d\r\n\r\n" % len(JPG) + JPG)


def endless(h: BaseHTTPRequestHandler) -> None:
    """A chunked body that does not end (for 256 MiB; the client must cut it off long before)."""
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    block = b"%x\r\n%s\r\n" % (1 << 16, b"\xff" * (1 << 16))
    for _ in range(4096):
        h.wfile.write(block)


def truncated(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", str(len(JPG)))
    h.end_headers()
    h.wfile.write(JPG[:len(JPG) // 2])  # then the connection closes


def truncated_chunked(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.write(b"%x\r\n" % len(JPG) + JPG[:len(JPG) // 2])


@dataclass
class Visit:
    path: str
    accept_encoding: str | None
    started: float
    ended: float | None = None

    @property
    def held_s(self) -> float:
        assert self.ended is not None, f"{self.path} still being served"
        return self.ended - self.started


class HostileServer:
    """A ThreadingHTTPServer on 127.0.0.1 that plays one behaviour per path and records each visit."""

    def __init__(self) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.visits: list[Visit] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection; the end of a body is visible

            def do_GET(self) -> None:
                visit = Visit(self.path, self.headers.get("Accept-Encoding"), time.monotonic())
                server.visits.append(visit)
                try:
                    server.routes.get(self.path, serve(b"not found", "text/plain"))(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: what a guarded client does to a hostile server
                finally:
                    visit.ended = time.monotonic()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def visits_to(self, path: str) -> list[Visit]:
        return [v for v in self.visits if v.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ConnectionCounter:
    """Listens on one port of 127.0.0.1 and (where available) ::1 and records every connection made."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self._stop = threading.Event()
        self._socks = [socket.create_server(("127.0.0.1", 0))]
        self.port = self._socks[0].getsockname()[1]
        with contextlib.suppress(OSError):  # without IPv6 loopback, [::1] is still refused before connect
            self._socks.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        for sock in self._socks:
            sock.settimeout(0.2)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = sock.accept()
            except (TimeoutError, OSError):
                continue
            self.seen.append(peer)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for sock in self._socks:
            sock.close()


# Redirect targets: loopback and metadata under every spelling. `{p}` is the counting listener's port.
SPELLINGS: dict[str, tuple[str, str]] = {
    "v4-mapped-v6": ("http://[::ffff:127.0.0.1]:{p}/x", r"blocked: ::ffff:(7f00:1|127\.0\.0\.1) is loopback"),
    "unspecified": ("http://0.0.0.0:{p}/x", r"blocked: 0\.0\.0\.0 is unspecified"),
    "decimal": ("http://2130706433:{p}/x", r"blocked: 127\.0\.0\.1 is loopback .*resolved from 2130706433$"),
    "hex-short": ("http://0x7f.1:{p}/x", r"blocked: 127\.0\.0\.1 is loopback .*resolved from 0x7f\.1$"),
    "trailing-dot": ("http://localhost.:{p}/x", r"blocked: 127\.0\.0\.1 is loopback .*resolved from localhost$"),
    "ipv6-loopback": ("http://[::1]:{p}/x", r"blocked: ::1 is loopback"),
    "same-address-other-port": ("http://127.0.0.1:{p}/x", r"blocked: 127\.0\.0\.1 is loopback \(not in"),
    # a literal address, refused by the pre-connect URL check: nothing is ever sent to it
    "metadata": ("http://169.254.169.254/latest/meta-data/",
                 r"blocked: 169\.254\.169\.254 is a cloud metadata address \(not in allow-list\)$"),
}
OTHER_SCHEMES = {"file": "file:///etc/passwd", "gopher": "gopher://127.0.0.1:{p}/_x", "data": "data:,x"}


@dataclass
class Hostile:
    server: HostileServer
    counter: ConnectionCounter
    policy: NetPolicy
    big_png: bytes
    targets: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    server, counter = HostileServer(), ConnectionCounter()
    p = counter.port
    big = rgba_png(BIG_SIDE, BIG_SIDE)
    routes: dict[str, Behaviour] = {
        "/ok.jpg": serve(JPG), "/ok.png": serve(PNG, "image/png"),
        "/trickle-body": trickle_body, "/trickle-headers": trickle_headers, "/endless": endless,
        "/gzip-bomb": serve(gzip_bomb(GZIP_INFLATED), headers={"Content-Encoding": "gzip"}),
        "/truncated": truncated, "/truncated-chunked": truncated_chunked,
        # three hops, each well inside the timeout, together over the deadline
        "/slow-1": redirect("/slow-2", 0.8), "/slow-2": redirect("/slow-3", 0.8),
        "/slow-3": redirect("/slow-end", 0.8), "/slow-end": serve(JPG),
        **{f"/big-{i}.png": serve(big, "image/png") for i in range(3)},
    }
    targets = {name: url.format(p=p) for name, (url, _) in SPELLINGS.items()}
    for name, target in targets.items():  # a chain of two hops: the second points at the target
        routes[f"/to/{name}"] = redirect(f"/via/{name}")
        routes[f"/via/{name}"] = redirect(target)
    for scheme, target in OTHER_SCHEMES.items():
        routes[f"/to-{scheme}"] = redirect(target.format(p=p))
    server.routes = routes
    # Only this one server: loopback in general, and other ports on 127.0.0.1, stay blocked.
    policy = NetPolicy(allow_hosts=(f"127.0.0.1:{server.port}",))
    yield Hostile(server, counter, policy, big, targets)
    server.close()
    counter.close()


# --- in process: the guarded opener, every connect audited -------------------------------------------


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_redirect_to_any_loopback_spelling_is_blocked_before_connecting(
        hostile: Hostile, name: str, connects: list[tuple[object, ...]]) -> None:  # noqa: F811
    opener = build_guarded_opener(hostile.policy)
    with pytest.raises(NetBlocked) as info:
        opener.open(hostile.server.url(f"/to/{name}"), timeout=TIMEOUT_S)
    assert re.search(SPELLINGS[name][1], str(info.value)), str(info.value)
    # The only connections made were to the allowed server (both hops of the chain), none elsewhere.
    assert {c[0][:2] for c in connects} == {("127.0.0.1", hostile.server.port)}  # type: ignore[index]
    assert len(connects) == 2
    assert hostile.counter.seen == []
    rec = opener.curation_guard.recorder.drain()[0]  # type: ignore[attr-defined]
    assert (rec["http_status"], rec["final_url"]) == (302, hostile.targets[name])


def test_allow_list_entry_is_one_address_and_port_under_any_spelling(hostile: Hostile) -> None:
    opener = build_guarded_opener(hostile.policy)
    port, other = hostile.server.port, hostile.counter.port
    with opener.open(f"http://2130706433:{port}/ok.jpg", timeout=TIMEOUT_S) as r:  # the allowed server
        assert r.read() == JPG
    for url in (f"http://2130706433:{other}/", f"http://0x7f.1:{other}/", f"http://127.1:{other}/",
                f"http://localhost:{other}/", f"http://127.0.0.2:{port}/ok.jpg"):
        with pytest.raises(NetBlocked, match="loopback"):
            opener.open(url, timeout=TIMEOUT_S)
    assert hostile.counter.seen == []


@pytest.mark.parametrize("scheme", list(OTHER_SCHEMES))
def test_redirect_to_another_scheme_is_a_block_not_an_http_error(hostile: Hostile, scheme: str) -> None:
    opener = build_guarded_opener(hostile.policy)
    with pytest.raises(NetBlocked, match=f"^blocked: scheme '{scheme}' not allowed$"):
        opener.open(hostile.server.url(f"/to-{scheme}"), timeout=TIMEOUT_S)
    rec = opener.curation_guard.recorder.drain()[0]  # type: ignore[attr-defined]
    assert rec["blocked"] == f"blocked: scheme '{scheme}' not allowed"
    assert rec["final_url"] == OTHER_SCHEMES[scheme].format(p=hostile.counter.port)
    assert hostile.counter.seen == []


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers", "/slow-1"])
def test_deadline_bounds_the_whole_attempt(hostile: Hostile, path: str) -> None:
    """Each receive (or hop) comes well inside the timeout; only the overall deadline stops them."""
    opener = build_guarded_opener(hostile.policy, deadline_s=DEADLINE_S)
    started = time.monotonic()
    # urllib wraps it in a URLError when it strikes before the response is returned
    with pytest.raises((DeadlineExceeded, urllib.error.URLError)) as info, \
            opener.open(hostile.server.url(path), timeout=TIMEOUT_S) as r:
        r.read()
    elapsed = time.monotonic() - started
    err = info.value.reason if isinstance(info.value, urllib.error.URLError) else info.value
    assert isinstance(err, DeadlineExceeded), repr(info.value)
    assert str(err).startswith("timed out: deadline of 2 s")
    assert DEADLINE_S - 0.1 <= elapsed < DEADLINE_S + 1.0


def test_deadline_leaves_a_fast_response_alone(hostile: Hostile) -> None:
    opener = build_guarded_opener(hostile.policy, deadline_s=DEADLINE_S, max_connections_per_host=1)
    for _ in range(3):  # the slot is released: later fetches are unaffected
        with opener.open(hostile.server.url("/ok.png"), timeout=TIMEOUT_S) as r:
            assert r.read() == PNG


def test_encoded_body_is_refused_unread(hostile: Hostile) -> None:
    opener = build_guarded_opener(hostile.policy, max_body_bytes=MAX_BODY, deadline_s=DEADLINE_S)
    started = time.monotonic()
    with pytest.raises(UnsupportedEncoding, match=r"^unsupported Content-Encoding 'gzip'"):
        opener.open(hostile.server.url("/gzip-bomb"), timeout=TIMEOUT_S)
    assert time.monotonic() - started < 1.0
    assert hostile.server.visits_to("/gzip-bomb")[-1].accept_encoding == "identity"  # we asked for none


def test_flattening_alpha_gives_img2dataset_identical_output() -> None:
    """The banded flatten is a memory optimisation only: byte-identical to img2dataset's own matting."""
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (150, 201, 4), dtype=np.uint8), "RGBA")  # padded BMP rows
    blobs: dict[str, bytes] = {}
    for name, image, fmt, kwargs in (
            ("rgba-png", rgba, "PNG", {}), ("la-png", rgba.convert("LA"), "PNG", {}),
            ("palette-trns-png", rgba.convert("RGB").quantize(64), "PNG", {"transparency": 3}),
            ("rgba-webp", rgba, "WEBP", {"lossless": True})):
        buf = io.BytesIO()
        image.save(buf, fmt, **kwargs)
        blobs[name] = buf.getvalue()
    blobs["rgba16-png"] = cv2.imencode(".png", rng.integers(0, 1 << 16, (150, 201, 4), dtype=np.uint16))[1].tobytes()
    resize: dict[str, Any] = {"image_size": 64, "resize_mode": "keep_ratio", "resize_only_if_bigger": True}
    plain = Resizer(**resize)
    ours = GuardedResizer(min_image_bytes=0, max_image_pixels=10**8, allowed_formats=(),
                          flatten_alpha_above_pixels=0, **resize)
    for name, blob in blobs.items():
        want = plain(io.BytesIO(blob))
        assert want[-1] is None and want[0], name
        assert ours(io.BytesIO(blob)) == want, name
        banded = flatten_alpha(blob, band_pixels=1000)  # bands of 4 rows
        assert banded is not None, name
        assert plain(io.BytesIO(banded)) == want, name
    assert flatten_alpha(PNG) is None  # no alpha channel: left to img2dataset as it is
    assert ours(io.BytesIO(PNG)) == plain(io.BytesIO(PNG))


def test_deadline_config() -> None:
    assert DownloadConfig().url_deadline_s == 30.0  # 3 x the 10 s timeout
    assert DownloadConfig(timeout_s=2).url_deadline_s == 6.0
    assert DownloadConfig(deadline_s=5).url_deadline_s == 5.0
    for bad in ({"deadline_s": 0}, {"deadline_s": -1.0}, {"flatten_alpha_above_pixels": -1}):
        with pytest.raises(ValueError):
            DownloadConfig(**bad)


# --- img2dataset runs, each in a child process (workers' peak RSS) -----------------------------------


_CHILD = """
import json, resource, sys, time
import pyarrow.parquet as pq
from curation.download import DownloadConfig, download_images
from curation.netguard import NetPolicy
args = json.loads(sys.argv[1])
# This process's own high-water mark (VmHWM; ru_maxrss would carry the test process's over from exec).
# A worker's ru_maxrss starts from this process's at the fork: so it is the workers' baseline too.
with open("/proc/self/status") as f:
    stats = {"imported_rss_mb": next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024}
for job in args["jobs"]:
    started = time.monotonic()
    result = download_images(job["pairs"], job["out"], DownloadConfig(**job["config"]),
                             NetPolicy(allow_hosts=tuple(args["allow_hosts"])))
    pq.write_table(result.table, job["table"])
    stats[job["name"]] = {"wall_s": time.monotonic() - started,  # the peak of every worker so far
                          "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
with open(args["stats"], "w") as f:
    json.dump(stats, f)
"""


@dataclass
class Run:
    rows: list[dict[str, Any]]
    wall_s: float
    workers_peak_rss_mb: float  # img2dataset's worker processes, this run and the ones before it
    baseline_rss_mb: float  # the parent's peak once it had imported what a worker imports


def run_in_child(jobs: dict[str, tuple[list[str], dict[str, Any]]], hostile: Hostile, work: Path) -> dict[str, Run]:
    """Run download_images once per job, in order, in one child process (one start-up for all)."""
    specs: list[dict[str, Any]] = []
    for name, (urls, config) in jobs.items():
        pairs = work / f"{name}-pairs.parquet"
        pq.write_table(pa.table({R.UID: pa.array(range(len(urls)), pa.int64()), R.URL: urls,
                                 R.TEXT: [f"caption {i}" for i in range(len(urls))]}), pairs)
        specs.append({"name": name, "pairs": str(pairs), "out": str(work / name), "config": config,
                      "table": str(work / f"{name}-downloads.parquet")})
    args = {"jobs": specs, "stats": str(work / "stats.json"), "allow_hosts": list(hostile.policy.allow_hosts)}
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((work / "stats.json").read_text())
    return {spec["name"]: Run(pq.read_table(spec["table"]).to_pylist(), stats[spec["name"]]["wall_s"],
                              stats[spec["name"]]["workers_peak_rss_mb"], stats["imported_rss_mb"])
            for spec in specs}


# url path -> (status, reason, error pattern)
NETWORK_CASES: dict[str, tuple[str, str | None, str | None]] = {
    "/ok.jpg": (R.STATUS_SUCCESS, None, None),
    "/trickle-body": (R.STATUS_FAILED_DOWNLOAD, "timeout", r"timed out: deadline of 2 s"),
    "/trickle-headers": (R.STATUS_FAILED_DOWNLOAD, "timeout", r"timed out: deadline of 2 s"),
    "/slow-1": (R.STATUS_FAILED_DOWNLOAD, "timeout", r"timed out: deadline of 2 s"),
    "/endless": (R.STATUS_FAILED_DOWNLOAD, "too_large", rf"^body too large: more than {MAX_BODY} bytes$"),
    "/gzip-bomb": (R.STATUS_FAILED_DOWNLOAD, "unsupported_encoding", r"^unsupported Content-Encoding 'gzip'"),
    "/truncated": (R.STATUS_FAILED_DOWNLOAD, "truncated", r"^IncompleteRead\("),
    "/truncated-chunked": (R.STATUS_FAILED_DOWNLOAD, "truncated", r"^IncompleteRead\("),
    **{f"/to-{s}": (R.STATUS_BLOCKED, "ssrf_blocked", f"^blocked: scheme '{s}' not allowed$") for s in OTHER_SCHEMES},
    **{f"/to/{name}": (R.STATUS_BLOCKED, "ssrf_blocked", pattern) for name, (_, pattern) in SPELLINGS.items()},
    "/ok.png": (R.STATUS_SUCCESS, None, None),
}


MEMORY_PATHS = ["/ok.jpg", "/big-0.png", "/big-1.png", "/big-2.png", "/ok.png"]


@pytest.fixture(scope="module")
def runs(hostile: Hostile, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The network cases (8 threads), then a shard of large RGBA PNGs (32 threads), in one child."""
    hostile.counter.seen.clear()
    network = [hostile.server.url(path) for path in NETWORK_CASES]
    network.append(f"http://2130706433:{hostile.server.port}/ok.jpg")  # the allowed server, spelt otherwise
    network_config = {"image_size": 64, "timeout_s": TIMEOUT_S, "deadline_s": DEADLINE_S, "retries": 0,
                      "threads": 8, "max_image_bytes": MAX_BODY, "max_connections_per_host": None,
                      "number_sample_per_shard": 100}
    memory = [hostile.server.url(path) for path in MEMORY_PATHS]
    memory_config = {"image_size": 64, "timeout_s": 10.0, "retries": 0, "threads": 32,
                     "number_sample_per_shard": 100}
    return run_in_child({"network": (network, network_config), "memory": (memory, memory_config)},
                        hostile, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def network_run(runs: dict[str, Run]) -> Run:
    return runs["network"]


@pytest.fixture(scope="module")
def memory_run(runs: dict[str, Run]) -> Run:
    return runs["memory"]


def test_every_hostile_response_is_a_row_with_a_reason(network_run: Run, hostile: Hostile) -> None:
    rows = network_run.rows
    assert len(rows) == len(NETWORK_CASES) + 1
    for (path, (status, reason, pattern)), row in zip(NETWORK_CASES.items(), rows, strict=False):
        got = (row[R.STATUS], row[R.REASON], row[R.ERROR])
        assert (row[R.STATUS], row[R.REASON]) == (status, reason), (path, got)
        if pattern is None:
            assert row[R.ERROR] is None and (row[R.WIDTH], row[R.HEIGHT]) != (None, None), (path, got)
        else:
            assert re.search(pattern, row[R.ERROR]), (path, got)
        if status == R.STATUS_BLOCKED:  # blocked at the redirect target, after the hop that named it
            name = path[len("/to/"):]  # "/to/<spelling>" or "/to-<scheme>"
            target = hostile.targets[name] if path.startswith("/to/") else OTHER_SCHEMES[name]
            assert (row[R.HTTP_STATUS], row[R.FINAL_URL]) == (302, target.format(p=hostile.counter.port)), path
    assert rows[-1][R.STATUS] == R.STATUS_SUCCESS  # 2130706433:<allowed port> is the allowed server
    assert hostile.counter.seen == []  # no redirect reached another port, under any spelling


def test_hostile_servers_are_cut_off_at_the_deadline(network_run: Run, hostile: Hostile) -> None:
    for path in ("/trickle-body", "/trickle-headers"):
        visits = hostile.server.visits_to(path)
        assert visits, path
        for visit in visits:  # the server notices the hang-up on its next write, a trickle gap later
            assert visit.held_s < DEADLINE_S + 1.5, (path, visit.held_s)  # unguarded: 60 x 0.3 s = 18 s
    assert hostile.server.visits_to("/slow-3") and not hostile.server.visits_to("/slow-end")
    assert network_run.wall_s < 60


def test_network_run_memory_stays_bounded(network_run: Run) -> None:
    """The gzip bomb would inflate to 1 GiB and the endless body runs to 256 MiB: neither reaches memory."""
    extra = network_run.workers_peak_rss_mb - network_run.baseline_rss_mb
    print(f"network run: workers' peak RSS {network_run.workers_peak_rss_mb:.0f} MB "
          f"(baseline {network_run.baseline_rss_mb:.0f} MB), {network_run.wall_s:.1f} s")
    assert extra < 150


def test_large_alpha_pngs_resize_in_bounded_memory(memory_run: Run, hostile: Hostile) -> None:
    """Three ~390 KB RGBA PNGs of 9400x9400 px, 32 threads: img2dataset's own matting took ~6.4 GB for one."""
    extra = memory_run.workers_peak_rss_mb - memory_run.baseline_rss_mb
    print(f"big RGBA PNGs ({len(hostile.big_png)} bytes each): workers' peak RSS "
          f"{memory_run.workers_peak_rss_mb:.0f} MB (baseline {memory_run.baseline_rss_mb:.0f} MB), "
          f"{memory_run.wall_s:.1f} s")
    rows = memory_run.rows
    assert [r[R.STATUS] for r in rows] == [R.STATUS_SUCCESS] * len(MEMORY_PATHS), [r[R.ERROR] for r in rows]
    for row in rows[1:4]:
        assert (row[R.ORIGINAL_WIDTH], row[R.ORIGINAL_HEIGHT], row[R.WIDTH], row[R.HEIGHT]) == (
            BIG_SIDE, BIG_SIDE, 64, 64)
    # One image at a time: the decoded RGBA (353 MB) and its BMP (265 MB), then img2dataset's decode and
    # resize of the BMP (~800 MB, as for any 88 Mpx RGB image). Unflattened: ~6.4 GB.
    assert extra < 1500


def test_big_png_is_under_the_pixel_limit_and_small_on_the_wire(hostile: Hostile) -> None:
    """The memory case is a legal image, not a decompression bomb the header check would refuse."""
    with Image.open(io.BytesIO(hostile.big_png)) as im:
        assert im.mode == "RGBA" and im.size == (BIG_SIDE, BIG_SIDE)
    assert DownloadConfig().max_image_pixels >= BIG_SIDE * BIG_SIDE
    assert len(hostile.big_png) < 500_000
