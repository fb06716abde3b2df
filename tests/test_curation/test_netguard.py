"""Tests for the SSRF guard: policy rules, the guarded opener against loopback servers, body and host caps."""

from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import random
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from curation.netguard import (
    BodyTooLarge,
    NetBlocked,
    NetPolicy,
    TooManyRedirects,
    address_category,
    build_guarded_opener,
    check_url,
    installed_guard,
)

# --- a loopback web for tests (also used by test_download) -------------------------------------------


@dataclass
class Reply:
    """What the test server answers on one path."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None  # None: the real length; larger values simulate a truncated body
    delay_s: float = 0.0
    chunked: bool = False


def noise_image(width: int, height: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A random-noise image: incompressible, so a few hundred pixels already exceed 5000 bytes."""
    raw = random.Random(seed).randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), raw).save(buf, fmt)
    return buf.getvalue()


class LoopbackServer:
    """A ThreadingHTTPServer on a loopback address and ephemeral port, serving canned `Reply`s.

    Counts every request (and peak concurrency) so tests can prove what did or did not reach it.
    """

    def __init__(self, routes: dict[str, Reply | list[Reply]], host: str = "127.0.0.1") -> None:
        self.routes = routes
        self.requests: list[str] = []
        self.user_agents: list[str] = []
        self.active = 0
        self.peak = 0
        lock = threading.Lock()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # close after each response: truncation is visible

            def do_GET(self) -> None:
                with lock:
                    server.requests.append(self.path)
                    server.user_agents.append(self.headers.get("User-Agent", ""))
                    server.active += 1
                    server.peak = max(server.peak, server.active)
                try:
                    self._reply(server.next_reply(self.path))
                finally:
                    with lock:
                        server.active -= 1

            def _reply(self, reply: Reply) -> None:
                time.sleep(reply.delay_s)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(reply.body), 4096):
                        part = reply.body[i:i + 4096]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                length = len(reply.body) if reply.content_length is None else reply.content_length
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def next_reply(self, path: str) -> Reply:
        """The reply for `path`; a list of replies is served in order, its last one repeating."""
        with self._lock:
            route = self.routes.get(path, Reply(404, b"not found"))
            if isinstance(route, list):
                return route.pop(0) if len(route) > 1 else route[0]
            return route

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., LoopbackServer]]:
    servers: list[LoopbackServer] = []

    def start(routes: dict[str, Reply | list[Reply]], host: str = "127.0.0.1") -> LoopbackServer:
        srv = LoopbackServer(routes, host).__enter__()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.__exit__()


@pytest.fixture
def connects() -> Iterator[list[tuple[object, ...]]]:
    """Every socket.connect this process attempts while the test runs (via the audit hook)."""
    seen: list[tuple[object, ...]] = []
    state = {"on": True}

    def hook(event: str, args: tuple[object, ...]) -> None:
        if state["on"] and event == "socket.connect":
            seen.append(args[1:])

    _hooks.append(hook)
    yield seen
    state["on"] = False
    _hooks.remove(hook)


_hooks: list[Callable[[str, tuple[object, ...]], None]] = []


def _dispatch(event: str, args: tuple[object, ...]) -> None:
    for hook in list(_hooks):
        hook(event, args)


sys.addaudithook(_dispatch)  # audit hooks cannot be removed: install one dispatcher, once

LOOPBACK = NetPolicy.with_loopback()
JPEG = noise_image(64, 48)


# --- policy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "category"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("172.16.5.5", "private"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("fd12::1", "private"), ("100.64.1.1", "not globally routable"),
    ("169.254.169.254", "a cloud metadata address"), ("fd00:ec2::254", "a cloud metadata address"),
    ("100.100.100.200", "a cloud metadata address"),
    ("::ffff:127.0.0.1", "loopback (embedded in IPv6 ::ffff:7f00:1)"),
    ("64:ff9b::a00:1", "private (embedded in IPv6 64:ff9b::a00:1)"),
    ("2002:7f00:1::", "loopback (embedded in IPv6 2002:7f00:1::)"),
])
def test_internal_addresses_are_categorised(address: str, category: str) -> None:
    assert address_category(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_category(ipaddress.ip_address(address)) is None


def test_check_url_without_dns() -> None:
    policy = NetPolicy()
    assert check_url("http://127.0.0.1/x", policy) == "blocked: 127.0.0.1 is loopback (not in allow-list)"
    assert check_url("http://[::1]:8080/x", policy) == "blocked: ::1 is loopback (not in allow-list)"
    assert check_url("file:///etc/passwd", policy) == "blocked: scheme 'file' not allowed"
    assert check_url("ftp://example.com/a.jpg", policy) == "blocked: scheme 'ftp' not allowed"
    assert check_url("http://metadata.google.internal/v1/", policy) == (
        "blocked: metadata.google.internal is a cloud metadata host name (not in allow-list)")
    assert check_url("http://example.com/a.jpg", policy) is None  # names are checked at connect
    assert check_url("http://8.8.8.8/a.jpg", policy) is None


def test_allow_list_cidrs_and_host_ports() -> None:
    policy = NetPolicy(allow_cidrs=("10.0.0.0/8",), allow_hosts=("127.0.0.5:8080", "internal.test"))
    assert check_url("http://10.9.9.9/a", policy) is None
    assert check_url("http://127.0.0.5:8080/a", policy) is None
    assert check_url("http://127.0.0.5:8081/a", policy) is not None  # other port
    assert check_url("http://127.0.0.6:8080/a", policy) is not None
    assert policy.allows("internal.test", 1234, ipaddress.ip_address("192.168.1.1"))
    assert NetPolicy.with_loopback().allows("x", 80, ipaddress.ip_address("127.0.0.9"))


def test_policy_validates_on_construction() -> None:
    with pytest.raises(ValueError, match="bad CIDR"):
        NetPolicy(allow_cidrs=("10.0.0.0/33",))
    with pytest.raises(TypeError):
        NetPolicy(allow_cidrs="10.0.0.0/8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad port"):
        NetPolicy(allow_hosts=("host:99999",))
    with pytest.raises(ValueError, match="max_redirects"):
        NetPolicy(max_redirects=-1)


# --- the opener against loopback servers -------------------------------------------------------------


def test_default_policy_never_connects_to_loopback(serve: Callable[..., LoopbackServer],
                                                   connects: list[tuple[object, ...]]) -> None:
    srv = serve({"/a.jpg": Reply(body=JPEG)})
    opener = build_guarded_opener(NetPolicy())
    for url in (srv.url("/a.jpg"), f"http://localhost:{srv.port}/a.jpg", f"http://127.1:{srv.port}/a.jpg",
                f"http://2130706433:{srv.port}/a.jpg", f"http://0.0.0.0:{srv.port}/a.jpg",
                f"http://[::ffff:127.0.0.1]:{srv.port}/a.jpg"):
        with pytest.raises(NetBlocked, match=r"^blocked: .* (loopback|unspecified)"):
            opener.open(url, timeout=5)
    assert srv.requests == []
    assert connects == []  # refused before any socket.connect, not merely answered with an error


def test_metadata_endpoint_refused_without_any_connection(connects: list[tuple[object, ...]]) -> None:
    opener = build_guarded_opener(NetPolicy.with_loopback())
    started = time.perf_counter()
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/",
                "http://metadata.google.internal/computeMetadata/v1/", "http://100.100.100.200/latest/"):
        with pytest.raises(NetBlocked, match="cloud metadata"):
            opener.open(url, timeout=5)
    assert connects == []
    assert time.perf_counter() - started < 1.0


def test_allowed_loopback_fetch_records_status(serve: Callable[..., LoopbackServer]) -> None:
    srv = serve({"/a.jpg": Reply(body=JPEG), "/gone": Reply(404, b"no")})
    opener = build_guarded_opener(LOOPBACK)
    with opener.open(srv.url("/a.jpg"), timeout=5) as r:
        assert hashlib.sha256(r.read()).hexdigest() == hashlib.sha256(JPEG).hexdigest()
    with pytest.raises(urllib.error.HTTPError, match="404"):
        opener.open(srv.url("/gone"), timeout=5)
    recs = {r["url"]: r for r in opener.curation_guard.recorder.drain()}  # type: ignore[attr-defined]
    assert recs[srv.url("/a.jpg")]["http_status"] == 200
    assert recs[srv.url("/gone")]["http_status"] == 404


def test_every_redirect_hop_is_checked(serve: Callable[..., LoopbackServer],
                                       connects: list[tuple[object, ...]]) -> None:
    inner = serve({"/secret": Reply(body=b"internal")})
    outer = serve({"/hop": Reply(302, headers={"Location": "/to-inner"}),
                   "/to-inner": Reply(302, headers={"Location": inner.url("/secret")}),
                   "/to-name": Reply(302, headers={"Location": f"http://localhost:{inner.port}/secret"}),
                   "/to-ftp": Reply(302, headers={"Location": f"ftp://127.0.0.2:{inner.port}/x"})},
                  host="127.0.0.2")
    opener = build_guarded_opener(NetPolicy(allow_cidrs=("127.0.0.2/32",)))
    with pytest.raises(NetBlocked, match=r"blocked: 127\.0\.0\.1 is loopback"):
        opener.open(outer.url("/hop"), timeout=5)
    with pytest.raises(NetBlocked, match=r"resolved from localhost"):
        opener.open(outer.url("/to-name"), timeout=5)
    with pytest.raises(NetBlocked, match="scheme 'ftp'"):  # urllib itself would follow ftp://
        opener.open(outer.url("/to-ftp"), timeout=5)
    assert inner.requests == []
    assert outer.requests == ["/hop", "/to-inner", "/to-name", "/to-ftp"]
    assert {str(c[0][0]) for c in connects} == {"127.0.0.2"}  # type: ignore[index]
    recs = {r["url"]: r for r in opener.curation_guard.recorder.drain()}  # type: ignore[attr-defined]
    hop = recs[outer.url("/hop")]
    assert (hop["http_status"], hop["final_url"]) == (302, inner.url("/secret"))
    assert hop["blocked"].startswith("blocked: 127.0.0.1")


def test_redirect_hops_are_capped(serve: Callable[..., LoopbackServer]) -> None:
    routes = {f"/r{i}": Reply(302, headers={"Location": f"/r{i + 1}"}) for i in range(10)}
    srv = serve(routes)
    opener = build_guarded_opener(NetPolicy.with_loopback(max_redirects=3))
    with pytest.raises(TooManyRedirects, match="more than 3"):
        opener.open(srv.url("/r0"), timeout=5)
    assert srv.requests == ["/r0", "/r1", "/r2", "/r3"]


def test_redirects_on_one_host_do_not_deadlock_a_single_slot(serve: Callable[..., LoopbackServer]) -> None:
    srv = serve({"/a": Reply(302, headers={"Location": "/b"}), "/b": Reply(307, headers={"Location": "/c"}),
                 "/c": Reply(body=JPEG)})
    opener = build_guarded_opener(LOOPBACK, max_connections_per_host=1)
    opener.curation_guard.slots.wait_s = 3.0  # type: ignore[attr-defined]  # a leaked slot fails, not hangs
    for _ in range(3):  # slots are returned: later fetches do not wait either
        with opener.open(srv.url("/a"), timeout=5) as r:
            assert r.read() == JPEG


def test_https_goes_through_the_guarded_connect(serve: Callable[..., LoopbackServer],
                                                connects: list[tuple[object, ...]]) -> None:
    srv = serve({"/a.jpg": Reply(body=JPEG)})
    url = f"https://localhost:{srv.port}/a.jpg"  # a name, so only the connect-time check can refuse it
    with pytest.raises(NetBlocked, match="resolved from localhost"):
        build_guarded_opener(NetPolicy()).open(url, timeout=5)
    assert connects == [] and srv.requests == []
    # Allowed: the TCP connection is made, then TLS is attempted (and fails against a plain HTTP server).
    with pytest.raises(urllib.error.URLError) as info:
        build_guarded_opener(LOOPBACK).open(url, timeout=5)
    assert isinstance(info.value.reason, ssl.SSLError)
    assert connects


def test_body_cap_from_content_length_and_while_streaming(serve: Callable[..., LoopbackServer]) -> None:
    big = random.Random(1).randbytes(300_000)
    srv = serve({"/big": Reply(body=big), "/chunked": Reply(body=big, chunked=True),
                 "/fits": Reply(body=big[:1000], chunked=True)})
    opener = build_guarded_opener(LOOPBACK, max_body_bytes=100_000)
    with pytest.raises(BodyTooLarge, match="Content-Length 300000 > 100000"), \
            opener.open(srv.url("/big"), timeout=5) as r:
        r.read()
    with pytest.raises(BodyTooLarge, match="more than 100000 bytes"), \
            opener.open(srv.url("/chunked"), timeout=5) as r:
        r.read()
    with opener.open(srv.url("/fits"), timeout=5) as r:
        assert r.read() == big[:1000]


def test_truncated_body_is_an_error(serve: Callable[..., LoopbackServer]) -> None:
    srv = serve({"/cut": Reply(body=JPEG, content_length=len(JPEG) + 5000)})
    for limit in (None, 10**6):  # both read paths: plain http.client and our streaming loop
        opener = build_guarded_opener(LOOPBACK, max_body_bytes=limit)
        with pytest.raises(http.client.IncompleteRead), opener.open(srv.url("/cut"), timeout=5) as r:
            r.read()


@pytest.mark.parametrize(("cap", "expect_at_most"), [(2, 2), (None, None)])
def test_per_host_connection_cap(serve: Callable[..., LoopbackServer], cap: int | None,
                                 expect_at_most: int | None) -> None:
    srv = serve({"/slow": Reply(body=b"x" * 100, delay_s=0.15)})
    opener = build_guarded_opener(LOOPBACK, max_connections_per_host=cap)

    def fetch() -> None:
        with opener.open(srv.url("/slow"), timeout=5) as r:
            r.read()

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(srv.requests) == 8
    if expect_at_most is None:
        assert srv.peak > 2  # without a cap the same load does overlap: the capped case can fail
    else:
        assert srv.peak <= expect_at_most


def test_installed_guard_is_what_plain_urlopen_uses(serve: Callable[..., LoopbackServer]) -> None:
    srv = serve({"/a.jpg": Reply(body=JPEG)})
    with installed_guard(NetPolicy()), pytest.raises(NetBlocked):
        urllib.request.urlopen(srv.url("/a.jpg"), timeout=5)
    assert srv.requests == []
    with urllib.request.urlopen(srv.url("/a.jpg"), timeout=5) as r:  # default opener is back
        assert r.read() == JPEG


def test_no_file_or_proxy_handlers() -> None:
    opener = build_guarded_opener(NetPolicy())
    names = {type(h).__name__ for h in opener.handlers}
    assert not names & {"FileHandler", "FTPHandler", "DataHandler", "ProxyHandler", "CacheFTPHandler"}
    with pytest.raises(NetBlocked, match="scheme 'data'"):
        opener.open("data:text/plain,hello")


def test_unresolvable_host_is_an_ordinary_failure() -> None:
    opener = build_guarded_opener(NetPolicy())
    with pytest.raises(urllib.error.URLError, match="cannot resolve"):
        opener.open("http://does-not-exist.invalid/a.jpg", timeout=5)


def test_audit_hook_sees_real_connects(serve: Callable[..., LoopbackServer],
                                       connects: list[tuple[object, ...]]) -> None:
    """The `connects` fixture is not vacuous: an allowed fetch does show up."""
    srv = serve({"/a.jpg": Reply(body=JPEG)})
    with build_guarded_opener(LOOPBACK).open(srv.url("/a.jpg"), timeout=5) as r:
        r.read()
    assert any(c[0] == ("127.0.0.1", srv.port) for c in connects)
