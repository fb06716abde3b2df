"""SSRF guard for image downloads: a urllib opener that only connects to addresses the policy allows.

The guard checks the *resolved* address at connect time: a host name is resolved once, every address is
validated, and the socket connects to exactly those validated addresses, so DNS rebinding cannot swap in
an internal address between check and use. Every redirect hop is a new request, so it is validated
again (scheme, literal address, metadata names up front; resolved addresses at connect) and the hop
count is capped. Blocked requests raise `NetBlocked`, which urllib does not wrap: the caller (img2dataset's
`download_image`) turns it into a per-record error string such as
``blocked: 127.0.0.1 is loopback (not in allow-list)``.

The opener has no file://, ftp:// or data: handler and no proxy handler (a proxy would resolve the target
itself, out of the guard's sight). It also enforces a streaming body-size cap, a per-host concurrency cap
(per process: the semaphores live in the process that opens the connections) and records, per original
URL, the last HTTP status and the final URL for the `downloads` table.

Hostile servers: an optional overall deadline per attempt (`deadline_s`) bounds the whole exchange, from
the first connection through every redirect hop to the last body byte. Socket timeouts alone bound only
each single receive, so a server trickling a byte a second held a connection for as long as it liked;
now every receive waits at most for what is left of the deadline and then fails with `DeadlineExceeded`
("timed out: …"). Bodies are taken as sent: the opener asks for `Accept-Encoding: identity` and refuses a
response with any other Content-Encoding (`UnsupportedEncoding`) before reading it, so a gzip bomb is never
inflated. Redirects to schemes urllib itself refuses (file:, gopher:, data: …) are policy blocks like any
other (`NetBlocked`), not urllib's HTTPError. Not bounded by the deadline: the DNS lookup (getaddrinfo
has no timeout of its own; the resolver's retries bound it).

Other policies plug in as opener extensions (`OpenerExtension`: handlers added to the guarded opener),
so they see every hop the guard sees: curation.consent checks robots.txt before each hop and the TDMRep
header on each response; `NetGuard.record_refusal` lets them write their refusals into the hop record.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

# Cloud instance-metadata endpoints: blocked even where a broader category would not catch them
# (100.100.100.200 sits in shared address space, fd00:ec2::254 in unique-local space).
METADATA_ADDRESSES: frozenset[str] = frozenset({
    "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack
    "169.254.169.253",  # AWS VPC DNS
    "169.254.170.2",  # AWS ECS task metadata
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud (legacy)
    "fd00:ec2::254",  # AWS IMDS over IPv6
})
METADATA_HOSTNAMES: frozenset[str] = frozenset({
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
})
ALLOWED_SCHEMES = ("http", "https")
LOOPBACK_CIDRS = ("127.0.0.0/8", "::1/128")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetBlocked(Exception):
    """A request the policy refuses; the message is the per-record reason (starts with 'blocked: ')."""


class TooManyRedirects(Exception):
    """A redirect chain longer than the policy allows."""


class BodyTooLarge(Exception):
    """A response body over the byte cap, detected from Content-Length or while streaming."""


class DeadlineExceeded(TimeoutError):
    """An attempt that ran past its overall deadline (connect, redirects and body together).

    A TimeoutError, so urllib treats it like a socket timeout; the message starts with 'timed out'.
    """


class UnsupportedEncoding(Exception):
    """A response whose Content-Encoding is not identity: its body would have to be inflated to be used."""


def _time_left(deadline: float, deadline_s: float) -> float:
    """Seconds left until `deadline` (time.monotonic); raise DeadlineExceeded when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"timed out: deadline of {deadline_s:g} s per URL exceeded")
    return left


def _parse_host_port(entry: str) -> tuple[str, int | None]:
    """'host', 'host:port', '1.2.3.4:80', '[::1]:80' or '::1' -> (lowercase host, port or None)."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:  # a bare name, IPv4 or unbracketed IPv6 address
        host, port = entry, ""
    if not host:
        raise ValueError(f"allow_hosts entry has no host: {entry!r}")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"allow_hosts entry has a bad port: {entry!r}")
    try:
        host = str(ipaddress.ip_address(host))  # one spelling per address, as str() prints it
    except ValueError:
        host = host.rstrip(".")
    return host, int(port) if port else None


@dataclass(frozen=True)
class NetPolicy:
    """Which destinations downloads may reach beyond the public internet, and how far redirects may go.

    By default only globally routable unicast addresses are allowed. `allow_cidrs` (e.g. "10.0.0.0/8")
    allows addresses inside those networks; `allow_hosts` entries ("host", "host:port", "1.2.3.4:8080",
    "[::1]:80") allow a URL host name or a resolved address, optionally on one port only. An allow-list
    entry wins over every category, cloud metadata included, so list such addresses only on purpose.
    """

    allow_cidrs: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    max_redirects: int = 5
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    _hosts: tuple[tuple[str, int | None], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allow_cidrs, str) or isinstance(self.allow_hosts, str):
            raise TypeError("allow_cidrs and allow_hosts are tuples of strings, not a single string")
        try:
            nets = tuple(ipaddress.ip_network(c.strip(), strict=False) for c in self.allow_cidrs)
        except ValueError as err:
            raise ValueError(f"bad CIDR in allow_cidrs: {err}") from None
        object.__setattr__(self, "_networks", nets)
        object.__setattr__(self, "_hosts", tuple(_parse_host_port(h) for h in self.allow_hosts))
        if not 0 <= self.max_redirects <= 20:
            raise ValueError(f"max_redirects must be in [0, 20], got {self.max_redirects}")

    @classmethod
    def with_loopback(cls, **kwargs: Any) -> NetPolicy:
        """A policy that also allows loopback (127.0.0.0/8, ::1): for the local sample web and tests."""
        extra = tuple(kwargs.pop("allow_cidrs", ()))
        return cls(allow_cidrs=LOOPBACK_CIDRS + extra, **kwargs)

    def allows(self, host: str, port: int | None, address: IPAddress | None = None) -> bool:
        """True when an allow-list entry covers this URL host name or resolved address (and port)."""
        names = {host.lower().rstrip(".")}
        if address is not None:
            names.add(str(address))
            if any(address in net for net in self._networks if net.version == address.version):
                return True
        return any(h in names and (p is None or p == port) for h, p in self._hosts)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_category(ip: IPAddress) -> str | None:
    """Why an address is not a public destination ('loopback', 'private', …), or None if it is."""
    if str(ip) in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            cat = address_category(inner)
            if cat is not None:
                return f"{cat} (embedded in IPv6 {ip})"
    for name, flag in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flag:
            return name
    if not ip.is_global:
        return "not globally routable"
    return None


def check_address(ip: IPAddress, host: str, port: int | None, policy: NetPolicy) -> str | None:
    """The 'blocked: …' reason for connecting to `ip` (resolved from `host`), or None when allowed."""
    category = address_category(ip)
    if category is None or policy.allows(host, port, ip):
        return None
    return f"blocked: {ip} is {category} (not in allow-list)"


def check_url(url: str, policy: NetPolicy) -> str | None:
    """Checks that need no DNS: scheme, host present, metadata names, literal IP addresses.

    Returns the 'blocked: …' reason or None. Host names still go through `resolve_checked` at connect.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return f"blocked: scheme {scheme or '(none)'!r} not allowed"
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return "blocked: URL has no host"
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return "blocked: URL has a bad port"
    if host in METADATA_HOSTNAMES and not policy.allows(host, port):
        return f"blocked: {host} is a cloud metadata host name (not in allow-list)"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return check_address(ip, host, port, policy)


def resolve_checked(host: str, port: int, policy: NetPolicy) -> list[tuple[Any, ...]]:
    """Resolve `host` once and validate every address; raise `NetBlocked` if any is not allowed.

    Returns getaddrinfo tuples to connect to. A host whose answers mix public and internal addresses is
    refused as a whole: legitimate image hosts do not do that, rebinding attacks do. The special-use
    names of RFC 6761 never reach DNS: `localhost`, `localhost.` and `*.localhost` are looked up as
    `localhost` (the hosts file's loopback answer, then checked like any other), `*.invalid` fails.
    """
    name = host.lower().rstrip(".")
    if name in METADATA_HOSTNAMES and not policy.allows(name, port):
        raise NetBlocked(f"blocked: {name} is a cloud metadata host name (not in allow-list)")
    lookup = host
    if name == "localhost" or name.endswith(".localhost"):
        lookup = "localhost"  # "localhost." is not in the hosts file: it would go to a DNS server
    elif name == "invalid" or name.endswith(".invalid"):
        raise OSError(f"cannot resolve {host}: the .invalid domain never resolves (RFC 6761)")
    try:
        infos = socket.getaddrinfo(lookup, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"cannot resolve {host}: {err}") from None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        reason = check_address(ip, name, port, policy)
        if reason is not None:
            raise NetBlocked(reason if str(ip) == name else f"{reason}; resolved from {name}")
    return infos


def connect_checked(host: str, port: int, timeout: float | None, policy: NetPolicy,
                    source_address: tuple[str, int] | None = None) -> socket.socket:
    """A TCP socket connected to a validated address of host:port (tries each, like create_connection)."""
    errors: list[OSError] = []
    for family, socktype, proto, _, sockaddr in resolve_checked(host, port, policy):
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            errors.append(err)
    raise errors[-1] if errors else OSError(f"no address for {host}")


class HopRecorder:
    """Per original URL: the last HTTP status received, the last URL requested and any block reason.

    Thread-safe. A new attempt at the same URL (a retry) starts a fresh record, so the last attempt wins.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}

    def start(self, origin: str) -> None:
        with self._lock:
            self._records[origin] = {"url": origin, "final_url": origin, "http_status": None,
                                     "blocked": None}

    def hop(self, origin: str, url: str) -> None:
        self._update(origin, final_url=url)

    def response(self, origin: str, status: int) -> None:
        self._update(origin, http_status=status)

    def blocked(self, origin: str, url: str, reason: str) -> None:
        self._update(origin, final_url=url, blocked=reason)

    def _update(self, origin: str, **values: Any) -> None:
        with self._lock:
            self._records.setdefault(origin, {"url": origin, "final_url": origin, "http_status": None,
                                              "blocked": None}).update(values)

    def drain(self) -> list[dict[str, Any]]:
        """Return and forget every record."""
        with self._lock:
            out = list(self._records.values())
            self._records = {}
        return out


class HostSlots:
    """A bounded number of concurrent connections per host name, for the threads of one process."""

    def __init__(self, per_host: int | None, wait_s: float = 300.0) -> None:
        self.per_host = per_host
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._sems: dict[str, threading.BoundedSemaphore] = {}

    def acquire(self, host: str, wait_s: float | None = None) -> Callable[[], None]:
        """Block until a slot for `host` is free; return a release function that is safe to call twice.

        Waits at most `wait_s` (default: the instance's `wait_s`), then raises TimeoutError.
        """
        if self.per_host is None:
            return lambda: None
        with self._lock:
            sem = self._sems.setdefault(host, threading.BoundedSemaphore(self.per_host))
        wait = self.wait_s if wait_s is None else min(wait_s, self.wait_s)
        if not sem.acquire(timeout=wait):
            raise TimeoutError(f"timed out: waited {wait:.1f}s for a connection slot to {host}")
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                sem.release()

        return release


class _DeadlineReader(io.RawIOBase):
    """A response's raw socket reader whose every receive waits at most for what is left of a deadline.

    http.client reads the status line, headers and body through one buffered file over the socket, and a
    socket timeout restarts with each receive; this shortens it, per receive, to the time left.
    """

    def __init__(self, file: Any, sock: socket.socket, deadline: float, deadline_s: float) -> None:
        super().__init__()
        self._file = file  # sock.makefile's buffered file: closing it (not dropping it) releases the socket
        self._raw = file.raw
        self._sock = sock
        self._deadline = deadline
        self._deadline_s = deadline_s
        self._timeout = sock.gettimeout()

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return int(self._raw.fileno())

    def readinto(self, buffer: Any) -> int | None:
        left = _time_left(self._deadline, self._deadline_s)
        if self._timeout is None or left < self._timeout:  # only touch the socket near the deadline
            self._timeout = left
            self._sock.settimeout(left)
        try:
            n: int | None = self._raw.readinto(buffer)
            return n
        except TimeoutError:
            _time_left(self._deadline, self._deadline_s)  # the deadline, not the per-receive timeout, fired
            raise

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class GuardedResponse(http.client.HTTPResponse):
    """An HTTPResponse under the guard's limits, which frees its host slot when closed.

    It caps the body while streaming and, given a deadline, reads the status line, headers and body
    through a `_DeadlineReader`.
    """

    curation_max_bytes: int | None = None
    curation_release: Callable[[], None] | None = None
    _curation_seen = 0

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None, *, curation_deadline: tuple[float, float] | None = None) -> None:
        super().__init__(sock, debuglevel, method, url)
        if curation_deadline is not None:  # (monotonic deadline, its length in seconds)
            self.fp = io.BufferedReader(_DeadlineReader(self.fp, sock, *curation_deadline))

    def read(self, amt: int | None = None) -> bytes:
        limit = self.curation_max_bytes
        if limit is None:
            return super().read(amt)
        if amt is not None:
            return self._count(super().read(amt), limit)
        if self.length is not None and self._curation_seen + self.length > limit:
            self.close()
            raise BodyTooLarge(f"body too large: Content-Length {self.length} > {limit} bytes")
        chunks = []
        while True:  # stream in chunks so an unbounded (chunked or close-delimited) body is cut off early
            want = 1 << 16 if self.length is None else min(1 << 16, self.length)
            if want == 0:
                break
            chunk = self._count(super().read(want), limit)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        if self.length:  # Content-Length promised more than the server sent before closing
            missing = self.length
            self.close()
            raise http.client.IncompleteRead(data, missing)
        return data

    def _count(self, data: bytes, limit: int) -> bytes:
        self._curation_seen += len(data)
        if self._curation_seen > limit:
            self.close()
            raise BodyTooLarge(f"body too large: more than {limit} bytes")
        return data

    def close(self) -> None:
        try:
            super().close()
        finally:
            release, self.curation_release = self.curation_release, None
            if release is not None:
                release()


class GuardedHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection whose connect() resolves the host once and connects only to validated addresses.

    With a deadline, the connect (and the TLS handshake on top of it) waits at most for the time left.
    """

    response_class = GuardedResponse
    curation_policy: NetPolicy = NetPolicy()  # the strictest policy unless the factory sets one
    curation_deadline: tuple[float, float] | None = None  # (monotonic deadline, its length in seconds)

    def connect(self) -> None:
        sys.audit("http.client.connect", self, self.host, self.port)
        timeout = self.timeout
        if self.curation_deadline is not None:
            left = _time_left(*self.curation_deadline)
            timeout = left if timeout is None else min(timeout, left)
        self.sock = connect_checked(self.host, self.port, timeout, self.curation_policy,
                                    getattr(self, "source_address", None))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GuardedHTTPSConnection(http.client.HTTPSConnection, GuardedHTTPConnection):
    """HTTPS on top of the guarded connect(): HTTPSConnection.connect calls it, then wraps TLS with SNI."""


def _origin(req: urllib.request.Request) -> str:
    return str(getattr(req, "curation_origin", req.full_url))


class _GuardedHandlerMixin:
    """Shared open logic: first-hop bookkeeping, pre-flight URL check, host slot, response limits."""

    guard: NetGuard

    def _guarded_open(self, conn_class: type[http.client.HTTPConnection], req: urllib.request.Request,
                      **conn_args: Any) -> http.client.HTTPResponse:
        guard = self.guard
        if not hasattr(req, "curation_origin"):  # first hop of a new attempt
            req.curation_origin = req.full_url  # type: ignore[attr-defined]
            guard.recorder.start(req.full_url)
        origin = _origin(req)
        guard.recorder.hop(origin, req.full_url)
        reason = check_url(req.full_url, guard.policy)
        if reason is not None:
            guard.recorder.blocked(origin, req.full_url, reason)
            raise NetBlocked(reason)
        # The deadline starts once the first hop has its host slot (queueing behind our own politeness
        # cap is not the server's time); later hops wait for a slot only as long as the deadline allows.
        deadline: tuple[float, float] | None = getattr(req, "curation_deadline", None)
        wait = None if deadline is None else _time_left(*deadline)
        release = guard.slots.acquire((urlsplit(req.full_url).hostname or "").lower(), wait)
        if deadline is None and guard.deadline_s is not None:
            deadline = (time.monotonic() + guard.deadline_s, guard.deadline_s)
            req.curation_deadline = deadline  # type: ignore[attr-defined]
        try:
            factory = _connection_factory(conn_class, guard.policy, deadline)
            resp = self.do_open(factory, req, **conn_args)  # type: ignore[attr-defined]
        except NetBlocked as err:
            release()
            guard.recorder.blocked(origin, req.full_url, str(err))
            raise
        except BaseException:
            release()
            raise
        if isinstance(resp, GuardedResponse):
            resp.curation_release = release
            resp.curation_max_bytes = guard.max_body_bytes
        else:  # pragma: no cover - do_open always builds our response class
            release()
        return resp


def _connection_factory(conn_class: type[http.client.HTTPConnection], policy: NetPolicy,
                        deadline: tuple[float, float] | None) -> Callable[..., http.client.HTTPConnection]:
    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        conn = conn_class(host, **kwargs)
        conn.curation_policy = policy  # type: ignore[attr-defined]
        conn.curation_deadline = deadline  # type: ignore[attr-defined]
        if deadline is not None:  # http.client builds the response as response_class(sock, method=…)
            conn.response_class = functools.partial(  # type: ignore[assignment]
                GuardedResponse, curation_deadline=deadline)
        return conn
    return make


class GuardedHTTPHandler(_GuardedHandlerMixin, urllib.request.HTTPHandler):
    def __init__(self, guard: NetGuard) -> None:
        super().__init__()
        self.guard = guard

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self._guarded_open(GuardedHTTPConnection, req)


class GuardedHTTPSHandler(_GuardedHandlerMixin, urllib.request.HTTPSHandler):
    def __init__(self, guard: NetGuard) -> None:
        super().__init__(context=guard.ssl_context)
        self.guard = guard

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self._guarded_open(GuardedHTTPSConnection, req, context=self._context)  # type: ignore[attr-defined]


class RefuseOtherSchemes(urllib.request.BaseHandler):
    """Catches every scheme without a handler (file, ftp, data…) and refuses it as a policy block."""

    handler_order = 10_000

    def __init__(self, guard: NetGuard) -> None:
        self.guard = guard

    def unknown_open(self, req: urllib.request.Request) -> None:
        reason = f"blocked: scheme {req.type!r} not allowed"
        self.guard.recorder.blocked(_origin(req), req.full_url, reason)
        raise NetBlocked(reason)


class ResponseRecorder(urllib.request.BaseHandler):
    """Records each hop's status; closes non-2xx responses early (their bodies are never needed).

    Runs before urllib's HTTPErrorProcessor (order 1000), which turns non-2xx into redirects or errors.
    Closing here also frees the host slot before a redirect opens the next hop, and stops urllib's
    redirect handler from reading an unbounded 3xx body. A 2xx response with a Content-Encoding other than
    identity is closed unread and refused (`UnsupportedEncoding`): urllib never inflates bodies, and
    neither do we (a small gzip body can inflate to gigabytes).
    """

    handler_order = 900

    def __init__(self, guard: NetGuard) -> None:
        self.guard = guard

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        self.guard.recorder.response(_origin(req), int(response.status))
        if not 200 <= response.status < 300:
            response.close()
            return response
        encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            response.close()
            raise UnsupportedEncoding(f"unsupported Content-Encoding {encoding[:40]!r}: bodies are never inflated")
        return response

    https_response = http_response


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows at most `policy.max_redirects` hops, each pre-checked; the connect check runs again.

    The hop inherits the attempt's origin, hop count and deadline.
    """

    max_redirections = 21  # above NetPolicy's ceiling of 20, so urllib's own cap never fires first

    def __init__(self, guard: NetGuard) -> None:
        self.guard = guard

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                       headers: Any) -> Any:
        """Block a redirect to a scheme we do not fetch before urllib's own check answers it.

        urllib refuses schemes other than http, https and ftp with an HTTPError of its own before
        `redirect_request` runs, which would record a file:// or gopher:// redirect as a failed download
        instead of a blocked one.
        """
        location = headers["location"] if "location" in headers else headers.get("uri")  # as urllib picks
        if location is not None:
            target = urljoin(req.full_url, location)
            if urlsplit(target).scheme.lower() not in ALLOWED_SCHEMES:
                reason = check_url(target, self.guard.policy) or f"blocked: redirect to {target[:200]!r}"
                self.guard.recorder.blocked(_origin(req), target, reason)
                raise NetBlocked(reason)
        return super().http_error_302(req, fp, code, msg, headers)

    # The base class binds these names to its own http_error_302: rebind them to ours.
    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        origin = _origin(req)
        hops = int(getattr(req, "curation_hops", 0)) + 1
        if hops > self.guard.policy.max_redirects:
            self.guard.recorder.hop(origin, newurl)
            raise TooManyRedirects(f"too many redirects (more than {self.guard.policy.max_redirects})")
        reason = check_url(newurl, self.guard.policy)
        if reason is not None:
            self.guard.recorder.blocked(origin, newurl, reason)
            raise NetBlocked(reason)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.curation_origin = origin  # type: ignore[attr-defined]
            new.curation_hops = hops  # type: ignore[attr-defined]
            new.curation_deadline = getattr(req, "curation_deadline", None)  # type: ignore[attr-defined]
        return new


class OpenerExtension(Protocol):
    """Extra urllib handlers for a guarded opener (e.g. curation.consent.ConsentPolicy). Implementations
    are frozen dataclasses: hashable and comparable, since they are part of the process guard's settings."""

    def handlers(self, guard: NetGuard) -> Sequence[urllib.request.BaseHandler]: ...


class NetGuard:
    """The runtime state behind one guarded opener: policy, limits, host slots and the hop recorder.

    `deadline_s` bounds each attempt at a URL as a whole (connect, TLS, every redirect hop, headers and
    body); None leaves only the per-receive socket timeout that urlopen's `timeout` sets.
    """

    def __init__(self, policy: NetPolicy, *, max_body_bytes: int | None = None,
                 max_connections_per_host: int | None = None, deadline_s: float | None = None,
                 ssl_context: Any = None, extensions: Sequence[OpenerExtension] = ()) -> None:
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be positive or None, got {deadline_s}")
        self.policy = policy
        self.max_body_bytes = max_body_bytes
        self.deadline_s = deadline_s
        self.slots = HostSlots(max_connections_per_host)
        self.recorder = HopRecorder()
        self.ssl_context = ssl_context
        self.extensions = tuple(extensions)

    def record_attempt(self, req: urllib.request.Request) -> None:
        """Start the hop record of a first hop that ends before `_guarded_open` sees it (a retry starts afresh)."""
        if not hasattr(req, "curation_origin"):
            self.recorder.start(req.full_url)

    def record_refusal(self, req: urllib.request.Request, url: str, reason: str) -> None:
        """Record that hop `req` (first or later) was refused at `url`, before or after its response."""
        self.record_attempt(req)
        self.recorder.blocked(_origin(req), url, reason)

    def build_opener(self) -> urllib.request.OpenerDirector:
        """An OpenerDirector with only guarded handlers (http(s), redirects, errors) plus the extensions'."""
        opener = urllib.request.OpenerDirector()
        # Added to requests that do not set them; without Accept-Encoding a server may pick any coding.
        opener.addheaders = [*opener.addheaders, ("Accept-Encoding", "identity")]
        for handler in (GuardedHTTPHandler(self), GuardedHTTPSHandler(self), RefuseOtherSchemes(self),
                        ResponseRecorder(self), GuardedRedirectHandler(self),
                        urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                        *(h for ext in self.extensions for h in ext.handlers(self))):
            opener.add_handler(handler)
        return opener


def build_guarded_opener(policy: NetPolicy, *, max_body_bytes: int | None = None,
                         max_connections_per_host: int | None = None,
                         deadline_s: float | None = None) -> urllib.request.OpenerDirector:
    """A guarded opener with its own NetGuard (reachable as `opener.curation_guard`)."""
    guard = NetGuard(policy, max_body_bytes=max_body_bytes, max_connections_per_host=max_connections_per_host,
                     deadline_s=deadline_s)
    opener = guard.build_opener()
    opener.curation_guard = guard  # type: ignore[attr-defined]
    return opener


_process_guard: tuple[tuple[Any, ...], NetGuard] | None = None
_process_lock = threading.Lock()


def install_process_guard(policy: NetPolicy, *, max_body_bytes: int | None,
                          max_connections_per_host: int | None, deadline_s: float | None = None,
                          extensions: Sequence[OpenerExtension] = ()) -> NetGuard:
    """Install a guarded opener as this process's global urllib opener (urllib.request.install_opener).

    Idempotent per settings: a second call with the same settings keeps the existing guard, so the host
    slots are shared by every shard the process downloads. Meant for download worker processes, where
    library code calls `urllib.request.urlopen` without a context and therefore uses the global opener.
    """
    global _process_guard
    settings = (policy, max_body_bytes, max_connections_per_host, deadline_s, tuple(extensions))
    with _process_lock:
        if _process_guard is None or _process_guard[0] != settings:
            guard = NetGuard(policy, max_body_bytes=max_body_bytes,
                             max_connections_per_host=max_connections_per_host, deadline_s=deadline_s,
                             extensions=extensions)
            urllib.request.install_opener(guard.build_opener())
            _process_guard = (settings, guard)
        return _process_guard[1]


@contextmanager
def installed_guard(policy: NetPolicy, *, max_body_bytes: int | None = None,
                    max_connections_per_host: int | None = None, deadline_s: float | None = None,
                    extensions: Sequence[OpenerExtension] = ()) -> Iterator[NetGuard]:
    """Install the guard for the duration of a block, then go back to urllib's default opener."""
    global _process_guard
    try:
        yield install_process_guard(policy, max_body_bytes=max_body_bytes,
                                    max_connections_per_host=max_connections_per_host, deadline_s=deadline_s,
                                    extensions=extensions)
    finally:
        with _process_lock:
            urllib.request.install_opener(None)
            _process_guard = None
