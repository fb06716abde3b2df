"""Consent at crawl time: robots.txt (RFC 9309) per host and the TDMRep `tdm-reservation` response header.

Both checks plug into the guarded urllib opener (curation.netguard) as an opener extension, so they see
exactly the requests the downloader makes, every redirect hop included:

- robots.txt: before a hop is sent, the /robots.txt of its origin (scheme, host, port) is fetched, once
  per origin and worker process, through a guarded opener of its own: the same SSRF policy (redirects
  re-checked), the same per-host connection slots and per-URL deadline, read to at most `max_bytes`.
  The groups naming our product token apply, else the `*` groups, else none (RFC 9309 2.2.1); the
  longest matching Allow/Disallow wins and Allow wins a tie; `*` matches any run of characters and a
  final `$` anchors the end (2.2.2-2.2.3). A disallowed hop is never sent: `RobotsDisallowed`, whose
  message starts with ROBOTS_PREFIX (reason `robots_txt`).
- What a robots.txt answer means (RFC 9309 2.3.1): 2xx, its rules (a body over `max_bytes` is read to
  the cap and its partial last line dropped; lines that are not rules, binary garbage included, are
  ignored, so an unparseable file allows everything); 4xx but 429, "unavailable": everything allowed;
  a redirect chain the policy will not follow to its end, also unavailable (the RFC's MAY); 429 and
  5xx, "unreachable": the whole host disallowed (reason `robots_txt`). A network failure (DNS, refused,
  timeout, truncated body, TLS, an encoded body) is unreachable too, so the host's URLs are not
  requested either, but their rows keep that failure's own reason (`dns_error`, `timeout` …, status
  failed_to_download): the host never answered, and a dead host's images are not consent refusals.
  A robots.txt request the SSRF guard refuses (the host resolves inside, or robots.txt redirects
  inside) blocks the image with the guard's reason (`ssrf_blocked`); nothing is sent inside.
- TDMRep (W3C, 2024): a 2xx image response carrying `tdm-reservation: 1` is closed with its body
  unread: `TdmReserved`, message starting with TDM_PREFIX (reason `tdm_reservation`). The per-host
  `/.well-known/tdmrep.json` file is not read.

Why a cache per worker process and not one on disk shared by the workers: a process keeps its guard
(and so this cache) for every shard it downloads, so the extra requests are at most one per origin and
process (`processes` is 1-2 here; even a machine running 16 workers sends 16 small requests to a host
that serves thousands of images), and there is no cross-process locking, no stale file from an earlier
run to trust, and nothing to clean up after a crash. The cache holds the rules that apply to us
only, for at most `cache_hosts` origins (least recently used first out), and lives as long as the run
(RFC 9309 2.4 allows a day).

`urllib.robotparser` is not used: it picks the first matching rule instead of the longest, has no `*`
or `$` wildcards, and treats a 5xx robots.txt as allow-all after a failed read.
"""

from __future__ import annotations

import string
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from curation.netguard import NetBlocked, NetGuard, TooManyRedirects, check_url

ROBOTS_PREFIX = "disallowed by robots.txt: "
TDM_PREFIX = "TDM reservation: "
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 2.5: crawlers must parse at least 500 KiB
ROBOTS_CACHE_HOSTS = 100_000
TDM_HEADER = "tdm-reservation"

# What an origin's robots.txt answer means for its URLs.
RULES = "rules"  # a 2xx: judge each URL by the rules
ALLOW_ALL = "allow_all"  # unavailable (4xx but 429, unfollowable redirects): no restrictions
DISALLOW_ALL = "disallow_all"  # unreachable (429, 5xx): the whole host is off limits
REFUSED = "refused"  # the SSRF guard refused the robots.txt request: the image is blocked as well
FAILED = "failed"  # no answer at all (network): the image is not requested, its row keeps the failure

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


class RobotsDisallowed(Exception):
    """A URL its origin's robots.txt disallows for us; the message starts with ROBOTS_PREFIX."""


class TdmReserved(Exception):
    """An image served with `tdm-reservation: 1`; the message starts with TDM_PREFIX."""


class RobotsUnreachable(Exception):
    """robots.txt could not be fetched at all; the message is the network error's (classified as such)."""


def normalize_path(value: str) -> str:
    """A path (or pattern) in RFC 9309's comparison form: %XX of unreserved characters decoded, other %XX
    upper-cased, non-ASCII, space and control characters percent-encoded as UTF-8. `*` and `$` are kept."""
    if value.isascii() and value.isprintable() and "%" not in value and " " not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "%" and i + 2 < len(value) and value[i + 1] in _HEX and value[i + 2] in _HEX:
            decoded = chr(int(value[i + 1:i + 3], 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + value[i + 1:i + 3].upper())
            i += 3
            continue
        if ord(c) <= 0x20 or ord(c) >= 0x7F:
            out.append("".join(f"%{b:02X}" for b in c.encode("utf-8", "replace")))
        else:
            out.append(c)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class RobotsRule:
    """One Allow or Disallow line: its normalized pattern, split at `*`, with the `$` anchor taken off."""

    allow: bool
    pattern: str
    parts: tuple[str, ...] = field(init=False, repr=False, compare=False)
    anchored: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        anchored = self.pattern.endswith("$")
        object.__setattr__(self, "anchored", anchored)
        object.__setattr__(self, "parts", tuple((self.pattern[:-1] if anchored else self.pattern).split("*")))

    @property
    def length(self) -> int:
        """How specific the rule is: its pattern's length in characters (octets, once normalized)."""
        return len(self.pattern)

    def matches(self, path: str) -> bool:
        """True when the pattern matches `path` from its start (to its end too when anchored with `$`).

        Each `*`-separated piece is found leftmost after the previous one: with `*` as the only wildcard
        that is exact, and linear in the path per piece, so a hostile pattern cannot make it backtrack.
        """
        first, *rest = self.parts
        if not path.startswith(first):
            return False
        pos = len(first)
        if not rest:
            return not self.anchored or pos == len(path)
        for piece in rest[:-1]:
            found = path.find(piece, pos)
            if found < 0:
                return False
            pos = found + len(piece)
        last = rest[-1]
        if self.anchored:
            return len(path) - len(last) >= pos and path.endswith(last)
        return path.find(last, pos) >= 0


def robots_rule(allow: bool, value: str) -> RobotsRule:
    """A rule from an Allow/Disallow value; a value starting with neither `/` nor `*` is read as `/value`."""
    value = value.strip()
    if not value.startswith(("/", "*")):
        value = "/" + value
    return RobotsRule(allow, normalize_path(value))


@dataclass(frozen=True)
class RobotsGroup:
    """The user agents (lower-case product tokens, or `*`) of one group and its rules, in file order."""

    agents: tuple[str, ...]
    rules: tuple[RobotsRule, ...]


@dataclass(frozen=True)
class RobotsRules:
    """The rules that apply to one crawler, most specific first (Allow before Disallow at equal length)."""

    group: str | None  # the product token whose groups applied, "*", or None when no group did
    rules: tuple[RobotsRule, ...] = ()

    def decide(self, path: str) -> RobotsRule | None:
        """The rule that decides `path` (normalized path and query), or None when no rule matches."""
        if path == "/robots.txt":  # RFC 9309 2.2.2: always allowed
            return None
        return next((rule for rule in self.rules if rule.matches(path)), None)

    def allows(self, path: str) -> bool:
        rule = self.decide(path)
        return rule is None or rule.allow


def _agent_token(value: str) -> str:
    """The product token of a user-agent line ("Googlebot/2.1 (+http…)" -> "googlebot"), lower-cased."""
    words = value.split()
    return words[0].split("/", 1)[0].lower() if words else ""


def parse_robots_txt(text: str) -> list[RobotsGroup]:
    """The groups of a robots.txt. Consecutive user-agent lines share a group; a user-agent line after a
    rule starts the next one. Comments, rules outside any group, empty rule values and other keys
    (sitemap, crawl-delay …) are skipped, as is any line without a colon: garbage never raises."""
    groups: list[RobotsGroup] = []
    agents: list[str] = []
    rules: list[RobotsRule] = []
    in_rules = False
    for raw in text.splitlines():
        key, colon, value = raw.split("#", 1)[0].partition(":")
        if not colon:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            if in_rules:
                groups.append(RobotsGroup(tuple(agents), tuple(rules)))
                agents, rules, in_rules = [], [], False
            agents.append(_agent_token(value))
        elif key in ("allow", "disallow") and agents:
            in_rules = True
            if value:  # "Disallow:" with no path disallows nothing
                rules.append(robots_rule(key == "allow", value))
    if agents:
        groups.append(RobotsGroup(tuple(agents), tuple(rules)))
    return groups


def rules_for(groups: Sequence[RobotsGroup], token: str) -> RobotsRules:
    """The rules for product token `token`: every group naming it combined, else every `*` group."""
    token = token.strip().lower()
    mine = [g for g in groups if token in g.agents]
    chosen = mine or [g for g in groups if "*" in g.agents]
    name = token if mine else "*" if chosen else None
    ordered = sorted((r for g in chosen for r in g.rules), key=lambda r: (-r.length, not r.allow))
    return RobotsRules(name, tuple(ordered))


def decode_robots_txt(data: bytes, max_bytes: int) -> str:
    """The text of a robots.txt body: at most `max_bytes`, a line cut by the cap dropped, UTF-8 with
    undecodable bytes replaced, a byte order mark removed."""
    if len(data) > max_bytes:
        data = data[:max_bytes]
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        data = data[:cut + 1] if cut >= 0 else b""
    return data.decode("utf-8", "replace").removeprefix("\ufeff")


@dataclass(frozen=True)
class RobotsAnswer:
    """What one origin's robots.txt said: a verdict (RULES, ALLOW_ALL, …), its rules, and why."""

    robots_url: str
    verdict: str
    rules: RobotsRules | None = None
    detail: str = ""


def _read_capped(response: Any, max_bytes: int) -> bytes:
    """Up to `max_bytes` + 1 bytes of a response body, read in chunks (the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = response.read(min(1 << 16, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def fetch_robots_txt(robots_url: str, guard: NetGuard, *, token: str, user_agent: str, timeout_s: float,
                     max_bytes: int) -> RobotsAnswer:
    """Fetch and judge one robots.txt through a guarded opener sharing `guard`'s policy, deadline and host
    slots (a fresh one per fetch, so its hop record is this fetch's alone). Never raises."""
    side = NetGuard(guard.policy, deadline_s=guard.deadline_s, ssl_context=guard.ssl_context)
    side.slots = guard.slots  # robots.txt requests count against the same per-host cap as images
    request = urllib.request.Request(robots_url, headers={"User-Agent": user_agent})
    try:
        with side.build_opener().open(request, timeout=timeout_s) as response:
            data = _read_capped(response, max_bytes)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 429 or err.code >= 500:
            return RobotsAnswer(robots_url, DISALLOW_ALL, detail=f"HTTP {err.code}")
        return RobotsAnswer(robots_url, ALLOW_ALL, detail=f"HTTP {err.code}")  # 4xx; 3xx: unfollowable
    except TooManyRedirects as err:
        return RobotsAnswer(robots_url, ALLOW_ALL, detail=str(err))
    except NetBlocked as err:
        hops = side.recorder.drain()
        final = hops[0]["final_url"] if hops else robots_url
        detail = str(err) if final == robots_url else f"{err}; robots.txt {robots_url} redirected there"
        return RobotsAnswer(robots_url, REFUSED, detail=detail)
    except Exception as err:  # network, timeout, truncated, encoded body: the host did not answer
        return RobotsAnswer(robots_url, FAILED, detail=str(err) or type(err).__name__)
    groups = parse_robots_txt(decode_robots_txt(data, max_bytes))
    return RobotsAnswer(robots_url, RULES, rules=rules_for(groups, token))


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answer: RobotsAnswer | None = None


class RobotsCache:
    """Answers per origin, fetched once each: threads asking for the same origin wait for one fetch.

    Holds at most `max_hosts` origins, least recently used dropped first. `fetches` counts fetches made.
    """

    def __init__(self, max_hosts: int = ROBOTS_CACHE_HOSTS) -> None:
        self.max_hosts = max_hosts
        self.fetches = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def get(self, robots_url: str, fetch: Callable[[str], RobotsAnswer]) -> RobotsAnswer:
        with self._lock:
            entry = self._entries.get(robots_url)
            if entry is None:
                entry = self._entries[robots_url] = _Entry()
                if len(self._entries) > self.max_hosts:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(robots_url)
        with entry.lock:
            if entry.answer is None:
                entry.answer = fetch(robots_url)
                with self._lock:
                    self.fetches += 1
            return entry.answer


def robots_url_of(url: str) -> str | None:
    """The robots.txt URL of `url`'s origin (scheme, host, port as written), or None without a host."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    netloc = parts.netloc.rsplit("@", 1)[-1]  # credentials are no part of the origin
    return f"{parts.scheme.lower()}://{netloc.lower()}/robots.txt"


def path_of(url: str) -> str:
    """The part of `url` robots.txt rules match: path (or "/") and query, normalized."""
    parts = urlsplit(url)
    return normalize_path((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))


class RobotsHandler(urllib.request.BaseHandler):
    """Checks each hop against its origin's robots.txt before it is sent (a request pre-processor, so it
    runs for the first request and for every redirect urllib follows)."""

    handler_order = 450  # before the http(s) handlers' own pre-processing (500); any order would do

    def __init__(self, guard: NetGuard, policy: ConsentPolicy) -> None:
        self.guard = guard
        self.policy = policy
        self.cache = RobotsCache(policy.cache_hosts)

    def _fetch(self, robots_url: str) -> RobotsAnswer:
        p = self.policy
        return fetch_robots_txt(robots_url, self.guard, token=p.user_agent_token, user_agent=p.user_agent,
                                timeout_s=p.timeout_s, max_bytes=p.robots_max_bytes)

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        url = req.full_url
        robots_url = robots_url_of(url)
        if robots_url is None or check_url(url, self.guard.policy) is not None:
            return req  # the guard refuses this hop itself, without asking its host anything
        answer = self.cache.get(robots_url, self._fetch)
        if answer.verdict == ALLOW_ALL:
            return req
        if answer.verdict == RULES:
            path = path_of(url)
            rule = answer.rules.decide(path) if answer.rules is not None else None
            if rule is None or rule.allow:
                return req
            group = answer.rules.group if answer.rules is not None else None
            reason = (f"{ROBOTS_PREFIX}{robots_url} has 'Disallow: {rule.pattern[:200]}' for user-agent "
                      f"{group}, matching {path[:200]}")
            self.guard.record_refusal(req, url, reason)
            raise RobotsDisallowed(reason)
        if answer.verdict == DISALLOW_ALL:
            reason = f"{ROBOTS_PREFIX}{robots_url} is unreachable ({answer.detail}): the whole host is disallowed"
            self.guard.record_refusal(req, url, reason)
            raise RobotsDisallowed(reason)
        if answer.verdict == REFUSED:
            self.guard.record_refusal(req, url, answer.detail)
            raise NetBlocked(answer.detail)
        self.guard.record_attempt(req)
        raise RobotsUnreachable(f"{answer.detail}; fetching {robots_url}, so {url[:200]} was not requested")

    https_request = http_request


class TdmHandler(urllib.request.BaseHandler):
    """Refuses a 2xx response carrying `tdm-reservation: 1` before its body is read."""

    handler_order = 950  # after ResponseRecorder (900) has recorded the status, before HTTPErrorProcessor

    def __init__(self, guard: NetGuard) -> None:
        self.guard = guard

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        if 200 <= response.status < 300 and tdm_reserved(response.headers):
            response.close()
            reason = f"{TDM_PREFIX}{req.full_url[:200]} is served with {TDM_HEADER}: 1"
            self.guard.record_refusal(req, req.full_url, reason)
            raise TdmReserved(reason)
        return response

    https_response = http_response


def tdm_reserved(headers: Any) -> bool:
    """True when response headers reserve TDM rights (`tdm-reservation: 1`, any of the header's lines)."""
    return any(str(value).strip() == "1" for value in headers.get_all(TDM_HEADER) or ())


@dataclass(frozen=True)
class ConsentPolicy:
    """Which consent signals downloads honour, as a netguard opener extension (hashable: the process
    guard is reinstalled only when its settings change)."""

    user_agent_token: str = "curation"  # our product token in robots.txt groups
    user_agent: str = "curation"  # the User-Agent header of robots.txt requests (the images' own)
    robots_txt: bool = True
    tdm_reservation: bool = True
    timeout_s: float = 10.0  # per connect and receive of a robots.txt request
    robots_max_bytes: int = ROBOTS_MAX_BYTES
    cache_hosts: int = ROBOTS_CACHE_HOSTS

    def __post_init__(self) -> None:
        if not self.user_agent_token.strip():
            raise ValueError("user_agent_token must not be empty")
        if self.robots_max_bytes < 1 or self.cache_hosts < 1 or not self.timeout_s > 0:
            raise ValueError("robots_max_bytes, cache_hosts and timeout_s must be positive")

    def handlers(self, guard: NetGuard) -> list[urllib.request.BaseHandler]:
        """The handlers to add to `guard`'s opener: robots.txt and/or TDMRep checks."""
        out: list[urllib.request.BaseHandler] = []
        if self.robots_txt:
            out.append(RobotsHandler(guard, self))
        if self.tdm_reservation:
            out.append(TdmHandler(guard))
        return out
