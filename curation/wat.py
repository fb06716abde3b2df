"""Common Crawl WAT files -> (image URL, alt text) pairs: LAION-5B's extraction rules, with its bugs fixed.

Reading: a WAT is a multi-member gzip file, one member per WARC record (a leading `warcinfo`, then
`metadata` records whose payload is one JSON document). `iter_wat_records` streams it from a local
path or any fsspec URL, inflating one member at a time with zlib, so a record can be re-read later by
the byte offset of its member (`wat_record`). A corrupt member is counted and skipped by resynchronising
at the next gzip member header; a truncated tail is counted; a member inflating past
`max_record_bytes` (a gzip bomb) is inflated to its end without keeping the output, so it costs bounded
memory and the next member is found exactly; only a file that cannot be read at all raises
`WatReadError`. Every hostile record ends as a count by reason (see `INPUT_REASONS`), never an exception.

Rules (see shared reference `laion-pipeline.md` §2-4): `IMG@/src` links of `response` records, resolved
against `<base href>` and the page URL *before* validation (LAION-5B validated first and so lost every
relative `src`), LAION's URL blocklist and host/length limits, ftfy-cleaned alt text of at least
5 characters, pycld2 language ID with LAION's reliability rule, and LAION's published `hash` as `uid`.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, NamedTuple
from urllib.parse import quote, urljoin, urlsplit

import fsspec
import ftfy
import mmh3
import pyarrow as pa
import pycld2

from curation import records as R
from curation.blocklist import CrawlBlocklist

# Compressed bytes fetched per read from the (possibly remote) file.
_READ_SIZE = 4 << 20
# Compressed bytes handed to zlib per call. zlib copies whatever follows the end of a member into
# `unused_data`, so feeding the whole read buffer would copy megabytes per record; a small window keeps
# that copy cheap while still amortising the per-call overhead (measured: 16-64 KiB are equally fast).
_FEED_SIZE = 32 << 10
# Most inflated bytes one zlib call may return. Deflate expands up to 1032:1, so without a limit one feed
# window could return 33 MiB at once; 1 MiB is far above what a real feed inflates to (~100-300 KiB).
_INFLATE_STEP = 1 << 20
# Default cap on one gzip member. Common Crawl truncates every capture at 1 MiB (5 MiB is planned), and a WAT
# record is JSON about that capture's links and metadata, a few times its size at worst (a bare `<a href=x>`
# becomes `{"path":"A@/href","url":"x"},`): about 4 MiB today, about 20 MiB at the planned limit. 32 MiB
# refuses no real record yet bounds what one record costs: its inflated bytes, their payload copy, the decoded
# text and the parsed JSON. Parsed, hostile JSON grows up to ~30x: a 32 MiB record of 1M image links took
# 0.53 GB, of 11M empty objects (full parse) 0.9 GB (tests/test_curation/test_wat_hostile.py), so a larger
# cap should be weighed against the memory of one extraction worker.
MAX_RECORD_BYTES = 32 << 20
_GZIP_MAGIC = b"\x1f\x8b\x08"
_HEADER_END = b"\r\n\r\n"
# LAION's pre-filter: only payloads that mention an <img> are worth JSON-decoding.
_IMG_MARKER = b"IMG@"
_IMG_SRC_PATH = "IMG@/src"

HeaderValue = str | list[str]


class WatReadError(Exception):
    """A WAT file that cannot be read at all: missing, unreachable, not gzip, or without a single record."""


@dataclass(frozen=True)
class ExtractConfig:
    """Thresholds of the extraction rules; the defaults are LAION-5B's."""

    min_alt_chars: int = 5
    max_alt_chars: int = 2000  # LAION cut alt texts to 2000 characters: a hostile page can't make huge captions
    max_url_chars: int = 2000
    max_host_chars: int = 60
    blocked_url_substrings: tuple[str, ...] = (".svg", ".gif")
    reliable_language_score: float = 0.7
    low_threshold_languages: tuple[str, ...] = ("hr", "bs")
    low_language_score: float = 0.5
    # A gzip member inflating to (or spanning) more bytes is refused as `record_too_large`; see MAX_RECORD_BYTES.
    max_record_bytes: int = MAX_RECORD_BYTES

    def __post_init__(self) -> None:
        for name in ("min_alt_chars", "max_alt_chars", "max_url_chars", "max_host_chars", "max_record_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ExtractConfig.{name} must be a positive integer, got {value!r}")
        for name in ("reliable_language_score", "low_language_score"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"ExtractConfig.{name} must be a number in [0, 1], got {value!r}")
        for name in ("blocked_url_substrings", "low_threshold_languages"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"ExtractConfig.{name} must be a tuple of non-empty strings, got {value!r}")


class WatRecord:
    """One WARC record of a WAT file: where its gzip member starts, its WARC headers, its payload.

    The header block is parsed on first access to `headers`: extraction never needs it.
    """

    __slots__ = ("_head", "_headers", "offset", "payload")

    def __init__(self, offset: int, head: bytes, payload: bytes) -> None:
        self.offset = offset
        self.payload = payload
        self._head = head
        self._headers: dict[str, HeaderValue] | None = None

    @property
    def headers(self) -> dict[str, HeaderValue]:
        """Named WARC fields; a repeated field is a list of its values."""
        if self._headers is None:
            self._headers = _parse_headers(self._head.decode("utf-8", errors="replace"))
        return self._headers

    def header(self, name: str) -> str:
        """A header's value, matched case-insensitively ('' when absent; the first value if repeated)."""
        value = self.headers.get(name)
        if value is None:
            lowered = name.lower()
            value = next((v for k, v in self.headers.items() if k.lower() == lowered), None)
        return first_value(value) or ""

    def __repr__(self) -> str:
        return f"WatRecord(offset={self.offset}, {len(self.payload)} payload bytes)"


@dataclass
class ExtractResult:
    """The pairs of one extraction call and what was dropped, by reason."""

    table: pa.Table
    counts: dict[str, int]
    per_file: dict[str, dict[str, int]]
    bytes_read: int


PAIRS_SCHEMA = pa.schema(
    [
        (R.UID, pa.int64()),
        (R.URL, pa.string()),
        (R.TEXT, pa.string()),
        (R.PAGE_URL, pa.string()),
        (R.LANGUAGE, pa.string()),
        (R.LANGUAGE_SCORE, pa.float32()),
        (R.CRAWL, pa.string()),
        (R.SEGMENT, pa.string()),
        (R.WAT_FILE, pa.string()),
        (R.WAT_RECORD, pa.int64()),
        (R.WARC_DATE, pa.string()),
    ]
)
assert tuple(PAIRS_SCHEMA.names) == R.PAIRS_COLUMNS

# Every count an extraction reports, so stats files always carry the same keys (new ones are appended).
INPUT_REASONS = (
    R.BAD_GZIP_MEMBER, R.TRUNCATED_FILE, R.BAD_JSON, R.BAD_ENCODING, R.BAD_RECORD, R.JSON_TOO_DEEP,
    R.RECORD_TOO_LARGE,
)
DROP_REASONS = (
    R.DROP_NOT_IMAGE_LINK, R.DROP_DATA_URI, R.DROP_JAVASCRIPT, R.DROP_SCHEME, R.DROP_SVG, R.DROP_GIF,
    R.DROP_BLOCKED_URL, R.DROP_URL_TOO_LONG, R.DROP_BAD_HOST, R.DROP_SHORT_ALT, R.DROP_DUPLICATE,
    R.DROP_SEEN_BEFORE, R.DROP_EMPTY_SRC, R.DROP_TAKEDOWN,
)
TOTALS = ("records", "pages", "image_links", "kept")


def first_value(value: object) -> str | None:
    """A header value as one string: CC stores repeated headers as JSON lists since CC-MAIN-2024-51.

    The first value wins, as for a repeated `<base>` in HTML; non-strings read as missing.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return next((v for v in value if isinstance(v, str)), None)
    return None


# ---------------------------------------------------------------------------------------------------
# Reading


class _Source:
    """A sliding window over a binary stream that keeps bytes from an anchor (a member's start) onward.

    The window is a bytearray edited in place: dropping its head is free and appending rarely copies, so a
    long member costs its retained bytes once, not two or three times as rebuilding a bytes object would.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.base = 0  # file offset of buf[0]
        self.eof = False
        self.bytes_read = 0

    def fill(self, anchor: int) -> bool:
        """Drop buf before `anchor` and append the next chunk; False at end of file."""
        if self.eof:
            return False
        chunk = self.stream.read(_READ_SIZE)
        if not chunk:
            self.eof = True
            return False
        self.bytes_read += len(chunk)
        del self.buf[:anchor]
        self.buf += chunk
        self.base += anchor
        return True


class WatReader:
    """Iterate the records of one WAT file; `problems` counts what had to be skipped, by reason.

    `on_problem(reason, offset)` is called for each problem as well, with the member's byte offset. A gzip
    member inflating to, or spanning, more than `max_record_bytes` is skipped as `record_too_large`; memory
    stays within about `max_record_bytes` plus one read buffer whatever the input.
    """

    def __init__(self, path: str, on_problem: Callable[[str, int], None] | None = None,
                 max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        self.path = path
        self.on_problem = on_problem
        self.max_record_bytes = max_record_bytes
        self.problems: dict[str, int] = dict.fromkeys(INPUT_REASONS, 0)
        self.records = 0
        self.bytes_read = 0

    def _problem(self, reason: str, offset: int) -> None:
        self.problems[reason] += 1
        if self.on_problem is not None:
            self.on_problem(reason, offset)

    def __iter__(self) -> Iterator[WatRecord]:
        try:
            handle = fsspec.open(self.path, mode="rb", block_size=_READ_SIZE).open()
        except Exception as exc:  # fsspec surfaces backend-specific errors (OSError, aiohttp, botocore)
            raise WatReadError(
                f"cannot open WAT file {self.path!r}: {type(exc).__name__}: {exc}. Check that the path or "
                "URL exists and that credentials for its filesystem are configured."
            ) from exc
        with handle:
            src = _Source(handle)
            try:
                yield from self._members(src)
            except OSError as exc:
                raise WatReadError(
                    f"reading WAT file {self.path!r} failed after {src.bytes_read} bytes: "
                    f"{type(exc).__name__}: {exc}. Retry; if it fails again, fetch the file anew."
                ) from exc
            finally:
                self.bytes_read = src.bytes_read
        if self.records == 0:
            found = ", ".join(f"{k}={v}" for k, v in self.problems.items() if v) or "no data"
            raise WatReadError(
                f"WAT file {self.path!r} holds no readable WARC record ({found}): it is not a WAT file or "
                "is damaged throughout. Fetch it anew from Common Crawl, or remove it from the inputs."
            )

    def _members(self, src: _Source) -> Iterator[WatRecord]:
        src.fill(0)
        if not src.buf:
            raise WatReadError(
                f"WAT file {self.path!r} is empty (0 bytes), probably an interrupted download. Fetch it anew "
                "from Common Crawl, or remove it from the inputs."
            )
        if not src.buf.startswith(b"\x1f\x8b"):
            raise WatReadError(
                f"WAT file {self.path!r} is not gzip (starts with {bytes(src.buf[:8])!r}); expected a Common Crawl "
                ".warc.wat.gz file. Check the path; if it is an error page saved by a download, fetch it anew."
            )
        cap = self.max_record_bytes
        pos = 0  # index into src.buf of the next member
        resyncing = False  # inside a corrupt stretch already counted
        while True:
            if pos >= len(src.buf):
                if not src.fill(pos):
                    return
                pos = 0
            start = pos  # the oldest byte of this member the buffer must keep (resynchronising needs it)
            offset = src.base + start
            inflater = zlib.decompressobj(31)
            pieces: list[bytes] = []
            size = 0  # inflated bytes so far
            error = too_large = pending = False  # pending: zlib may hold output for input it already took
            while True:
                end = min(pos + _FEED_SIZE, len(src.buf))
                if end == pos and not pending:
                    if src.base + pos - offset > cap:  # e.g. a huge gzip comment that inflates to nothing
                        too_large, pieces = True, []
                    # Past the cap the compressed bytes are dropped too, so the buffer cannot grow with them.
                    keep = pos if too_large else start
                    if not src.fill(keep):
                        break
                    pos -= keep
                    start = 0
                    continue
                try:
                    piece = inflater.decompress(memoryview(src.buf)[pos:end], _INFLATE_STEP)
                except zlib.error:
                    error = True
                    break
                pending = len(piece) == _INFLATE_STEP
                if not too_large:
                    size += len(piece)
                    if size > cap:  # keep inflating, to find the member's end, but keep nothing
                        too_large, pieces = True, []
                    else:
                        pieces.append(piece)
                if inflater.eof:
                    pos = end - len(inflater.unused_data)
                    break
                pos = end - len(inflater.unconsumed_tail)
            if error or not inflater.eof:
                # The file ended inside this member: it is the truncated tail only if no member starts after it.
                # Otherwise it is corrupt (a damaged length, or a false header met while resynchronising, made
                # zlib wait for bytes that never came) and the members after it must still be read.
                if not error and src.buf.find(_GZIP_MAGIC, start + 1) < 0:
                    if not resyncing:
                        self._problem(R.TRUNCATED_FILE, offset)
                    return
                if not resyncing:
                    self._problem(R.BAD_GZIP_MEMBER, offset)
                resyncing = True
                pos = self._resync(src, start + 1)
                continue
            resyncing = False
            if too_large or src.base + pos - offset > cap:
                self._problem(R.RECORD_TOO_LARGE, offset)
                continue
            data = b"".join(pieces)
            del pieces  # hold one copy of the member, not two, while its records are read
            yield from self._records(data, offset)

    @staticmethod
    def _resync(src: _Source, pos: int) -> int:
        """The index of the next gzip member header at or after `pos` (len(buf) at end of file)."""
        while True:
            found = src.buf.find(_GZIP_MAGIC, pos)
            if found >= 0:
                return found
            keep = max(pos, len(src.buf) - len(_GZIP_MAGIC) + 1)
            if not src.fill(keep):
                return len(src.buf)
            pos = 0

    def _records(self, data: bytes, offset: int) -> Iterator[WatRecord]:
        """The WARC records inside one inflated member (one in Common Crawl files, but any number is fine)."""
        at = 0
        while at < len(data):
            if not data.startswith(b"WARC/", at):
                if data[at:].strip():
                    self._problem(R.BAD_RECORD, offset)
                return
            head_end = data.find(_HEADER_END, at)
            if head_end < 0:
                self._problem(R.BAD_RECORD, offset)
                return
            head = data[at:head_end]
            length = _content_length(head)
            body = head_end + len(_HEADER_END)
            end = body + length
            if length < 0 or end > len(data):
                self._problem(R.BAD_RECORD, offset)
                return
            after = end
            while data.startswith(b"\r\n", after):
                after += 2
            # A record is followed by the next one or by nothing: other bytes mean its Content-Length is short,
            # so its block is cut. That is one bad record, counted once, not a record plus leftover bytes.
            if after < len(data) and not data.startswith(b"WARC/", after) and data[after:].strip():
                self._problem(R.BAD_RECORD, offset)
                return
            self.records += 1
            yield WatRecord(offset, head, data[body:end])
            at = after


def _content_length(head: bytes) -> int:
    """The Content-Length of a WARC header block, -1 when missing or invalid."""
    at = head.find(b"\r\nContent-Length:")
    if at >= 0:
        end = head.find(b"\r\n", at + 2)
        value: str | None = head[at + 17 : end if end >= 0 else len(head)].decode("latin-1")
    else:  # field names are case-insensitive: the slow path for unusual spellings
        fields = _parse_headers(head.decode("latin-1"))
        value = next((first_value(v) for k, v in fields.items() if k.lower() == "content-length"), None)
    try:
        length = int(value or "")
    except ValueError:
        return -1
    return length if length >= 0 else -1


def _parse_headers(text: str) -> dict[str, HeaderValue]:
    """WARC named fields; a repeated field becomes a list, a folded continuation line joins its field."""
    headers: dict[str, HeaderValue] = {}
    name = ""
    for line in text.split("\r\n")[1:]:
        if line[:1] in (" ", "\t") and name:
            previous = headers[name]
            if isinstance(previous, list):
                previous[-1] += " " + line.strip()
            else:
                headers[name] = previous + " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            name = ""
            continue
        name = name.strip()
        value = value.strip()
        existing = headers.get(name)
        if existing is None:
            headers[name] = value
        elif isinstance(existing, list):
            existing.append(value)
        else:
            headers[name] = [existing, value]
    return headers


def iter_wat_records(
    path: str, *, on_problem: Callable[[str, int], None] | None = None, max_record_bytes: int = MAX_RECORD_BYTES
) -> Iterator[WatRecord]:
    """Stream the WARC records of a WAT file (local path or fsspec URL).

    Problems (corrupt members, truncated tail, malformed records, members over `max_record_bytes`) are
    reported to `on_problem(reason, offset)` and skipped; `WatReadError` is raised if the file cannot be
    opened or yields no record.
    """
    return iter(WatReader(path, on_problem, max_record_bytes))


# ---------------------------------------------------------------------------------------------------
# Rules

_URL_EDGE = "".join(chr(c) for c in range(0x21))  # WHATWG: strip leading/trailing C0 controls and space
_URL_INNER = str.maketrans("", "", "\t\n\r")  # WHATWG: drop ASCII tab and newline anywhere
# Characters left alone when re-quoting (RFC 3986 reserved + unreserved + '%'), as requests' requote_uri.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
_URL_CHARS = r"[A-Za-z0-9\-._~!#$&'()*+,/:;=?@\[\]]*"
_URL_CLEAN = re.compile(f"{_URL_CHARS}(?:%[0-9A-Fa-f]{{2}}{_URL_CHARS})*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@lru_cache(maxsize=4096)
def _base_url(page_url: str, base: str) -> tuple[str, str]:
    """The URL relative `src` values resolve against, and its `scheme://host` origin ('' if it has none)."""
    url = urljoin(page_url, base.strip()) if base and base.strip() else page_url
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        return url, ""
    host_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return url, f"{scheme}://{rest[:host_end]}" if host_end else ""


def _join(page_url: str, base: str, raw: str) -> str:
    """`urljoin(urljoin(page_url, base), raw)`, skipping urljoin's parsing where its result is known.

    For an absolute http(s) URL, a root-relative path or a protocol-relative URL without dot segments
    urljoin only re-assembles its parse, which is the identity unless the reference ends in an empty
    query, fragment or ;params (tests compare both on tricky cases).
    """
    if raw[-1:] in ("?", "#", ";") or "?#" in raw or ";?" in raw or ";#" in raw:
        return urljoin(_base_url(page_url, base)[0], raw)
    if raw.startswith(("http://", "https://")):
        host_at = raw.index("//") + 2
        if len(raw) > host_at and raw[host_at] not in "/?#":
            return raw
    elif raw.startswith("//"):
        origin = _base_url(page_url, base)[1]
        if origin and len(raw) > 2 and raw[2] not in "/?#":
            return origin.partition("//")[0] + raw
    elif raw.startswith("/"):
        origin = _base_url(page_url, base)[1]
        path = raw.partition("?")[0].partition("#")[0]
        if origin and "/." not in path:
            return origin + raw
    return urljoin(_base_url(page_url, base)[0], raw)


def _scheme_host(url: str) -> tuple[str, str | None]:
    """`(urlsplit(url).scheme, urlsplit(url).hostname)`, by string slicing for plain http(s) URLs."""
    if url.startswith("https://"):
        scheme, rest = "https", url[8:]
    elif url.startswith("http://"):
        scheme, rest = "http", url[7:]
    else:
        parts = urlsplit(url)
        return parts.scheme, parts.hostname
    netloc = rest[: min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))]
    if not netloc.isascii() or "[" in netloc or "]" in netloc:  # IPv6 and IDNA checks: urlsplit's job
        parts = urlsplit(url)
        return parts.scheme, parts.hostname
    return scheme, netloc.rpartition("@")[2].partition(":")[0].lower() or None


def _requote(url: str) -> str:
    """Percent-quote characters HTTP clients reject (spaces, non-ASCII); already-quoted URLs are unchanged.

    A '%' that does not start a valid escape is itself quoted, so applying this twice changes nothing.
    Raises UnicodeError for a host that is not valid IDNA, UnicodeEncodeError for lone surrogates.
    """
    if _URL_CLEAN.fullmatch(url):
        return url
    scheme, sep, rest = url.partition("://")
    if sep:
        netloc_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        netloc = rest[:netloc_end]
        if not netloc.isascii():
            userinfo, at, hostport = netloc.rpartition("@")
            host, colon, port = hostport.partition(":")
            netloc = userinfo + at + host.encode("idna").decode("ascii") + colon + port
        url = f"{scheme}://{netloc}{rest[netloc_end:]}"
    safe = _URL_SAFE if _BAD_PERCENT.search(url) is None else _URL_SAFE.replace("%", "")
    return quote(url, safe=safe)


def resolve_image_url(
    page_url: str, base: str | None, raw: str, config: ExtractConfig
) -> tuple[str | None, str | None]:
    """Make an `<img src>` absolute and apply the URL rules: `(url, None)` if kept, `(None, reason)` if not.

    Resolution is `urljoin(urljoin(page_url, base or ""), raw)`. Drops, in order: `data:` and
    `javascript:` URLs, schemes other than http(s), URLs longer than `max_url_chars` after quoting,
    URLs containing a blocked substring (LAION's rule is a plain case-insensitive substring test, so
    `/a.gif.jpg` or `cdn.svgshop.com` are dropped too), and a missing, too long or percent-quoted host.
    An empty or blank `src` is dropped first: it would resolve to the page itself.
    """
    raw = raw.strip(_URL_EDGE)
    if "\n" in raw or "\t" in raw or "\r" in raw:
        raw = raw.translate(_URL_INNER)
    if not raw:
        return None, R.DROP_EMPTY_SRC
    head = raw[:11].lower()
    if head.startswith("data:"):
        return None, R.DROP_DATA_URI
    if head.startswith("javascript:"):
        return None, R.DROP_JAVASCRIPT
    try:
        url = _join(page_url, base or "", raw)
        scheme, host = _scheme_host(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket in the host
        return None, R.DROP_BAD_HOST
    if scheme not in ("http", "https"):
        if scheme == "data":
            return None, R.DROP_DATA_URI
        if scheme == "javascript":
            return None, R.DROP_JAVASCRIPT
        return None, R.DROP_SCHEME
    if len(url) > config.max_url_chars:  # cheap early exit before quoting
        return None, R.DROP_URL_TOO_LONG
    try:
        quoted = _requote(url)
    except UnicodeEncodeError:
        return None, R.BAD_ENCODING
    except UnicodeError:
        return None, R.DROP_BAD_HOST
    if quoted is not url:
        url = quoted
        if len(url) > config.max_url_chars:
            return None, R.DROP_URL_TOO_LONG
        try:
            host = _scheme_host(url)[1]
        except ValueError:
            return None, R.DROP_BAD_HOST
    lowered = url.lower()
    for blocked in config.blocked_url_substrings:
        if blocked in lowered:
            return None, _BLOCKED_REASONS.get(blocked, R.DROP_BLOCKED_URL)
    if not host or len(host) > config.max_host_chars or "%" in host:  # '%': a quoted space or the like
        return None, R.DROP_BAD_HOST
    return url, None


_BLOCKED_REASONS = {".svg": R.DROP_SVG, ".gif": R.DROP_GIF}


def clean_alt(raw: str, config: ExtractConfig) -> str | None:
    """LAION's alt cleaning: ftfy, whitespace to single spaces, printable characters only, stripped, cut to
    `config.max_alt_chars` characters (then stripped again).

    Returns None when fewer than `config.min_alt_chars` characters (Python `len`) remain.
    """
    if not raw or raw.isspace():
        return None
    # ftfy only changes ASCII text through HTML entities and terminal escapes; skipping it otherwise is
    # exact and saves ~20 µs per alt (tests compare against the full call).
    if not raw.isascii() or "&" in raw or "\x1b" in raw:
        raw = ftfy.fix_text(raw)
    text = raw
    if not text.isprintable():
        # Whitespace other than ' ' (tab, newline, NBSP, U+2028, …) is non-printable in Python: keep it
        # as a space, drop every other non-printable character.
        text = "".join(c if c.isprintable() else (" " if c.isspace() else "") for c in text)
    text = " ".join(text.split())
    if len(text) > config.max_alt_chars:
        text = text[:config.max_alt_chars].rstrip()
    return text if len(text) >= config.min_alt_chars else None


def laion_uid(url: str, text: str) -> int:
    """LAION's published `hash`: the first half of murmur3 x64 128 of url+text, as a signed int64."""
    return mmh3.hash64((url + text).encode("utf-8"), signed=True)[0]


# cld2 still reports a few pre-ISO-639-1 codes.
_LEGACY_CODES = {"iw": "he", "jw": "jv", "in": "id", "ji": "yi", "mo": "ro"}


def detect_language(text: str, config: ExtractConfig) -> tuple[str, float]:
    """(ISO 639 code or '' when unreliable/unknown, score in [0, 1]) for a cleaned alt text.

    LAION used gcld3, whose `is_reliable` is exactly "probability ≥ 0.7 (≥ 0.5 for hr and bs)". pycld2
    has no probability; its closest analogues are `isReliable` (cld2's own confidence flag, which also
    refuses very short or ambiguous text) and the top language's `percent` of the text bytes. So the
    score is percent/100, and a language is kept when cld2 calls it reliable and the score reaches
    `reliable_language_score`; for `low_threshold_languages` (hr/bs, which cld2 confuses with each
    other and with sr, like cld3) the flag is not required and `low_language_score` suffices.
    `bestEffort` stays off: with it cld2 labels random letters as reliable English.
    """
    try:
        reliable, _, details = pycld2.detect(text, isPlainText=True)
    except (pycld2.error, UnicodeError):  # cld2 rejects some code points as invalid UTF-8
        return "", 0.0
    code = details[0][1]
    if code == "un" or code.startswith("xx"):
        return "", 0.0
    code = code.split("-", 1)[0]
    code = _LEGACY_CODES.get(code, code)
    score = details[0][2] / 100.0
    if code in config.low_threshold_languages:
        ok = score >= config.low_language_score
    else:
        ok = reliable and score >= config.reliable_language_score
    return (code if ok else ""), score


# ---------------------------------------------------------------------------------------------------
# Extraction


class _Page(NamedTuple):
    """What extraction needs from one `response` record."""

    url: str
    date: str
    base: str
    images: list[Any]  # the `IMG@/src` entries of Links (dicts unless the input is malformed)
    other_img: int  # `IMG@/…` entries for another attribute
    bad_links: int  # Links entries that are not objects


class _NeedFullParse(Exception):
    """The targeted reader met a layout it does not handle; the full JSON parse decides."""


_DECODER = json.JSONDecoder()
_WARC_KEY = '"WARC-Header-Metadata":{'
_HTML_KEY = '"HTML-Metadata":{'
_HEAD_KEY = '"Head":{'
_LINKS_KEY = '"Links":['
_IMG_OBJECT = '{"path":"IMG@/src"'
_IMG_SRC_PAIR = '"path":"IMG@/src"'
_IMG_ANY_PAIR = '"path":"IMG@'


def _read_page(text: str) -> _Page | None:
    """The page of a WAT JSON document, or None when it is not a `response` with Links.

    Raises ValueError (json.JSONDecodeError) for malformed JSON, RecursionError for JSON nested deeper than
    the interpreter's recursion limit, KeyError for missing or wrongly typed fields, and UnicodeEncodeError
    for a page URL or date holding a lone surrogate (`"\\ud800"` is valid JSON, but no UTF-8 table holds it).
    """
    try:
        page = _read_page_targeted(text)
    except (_NeedFullParse, ValueError):
        page = _read_page_full(json.loads(text))
    if page is not None and not (page.url.isascii() and page.date.isascii()):
        page.url.encode("utf-8")
        page.date.encode("utf-8")
    return page


def _read_page_targeted(text: str) -> _Page | None:
    """Decode only the WARC header, `<head>` and the `IMG@/src` objects of a compact WAT document.

    Most of a WAT document is its Links array, and building ~100 dicts per page for anchors we then
    ignore costs more than inflating the record. Finding keys by substring is sound for JSON: inside a
    string every `"` is escaped, so `"Links":[` or `{"path":"IMG@/src"` can only be structure. The keys
    located here hold objects/arrays only where ia-web-commons puts them (HTTP header and <meta>
    attribute values are strings). Image links are found by their first key, as Common Crawl writes them
    ("path" first); if any `"path":"IMG@/src"` is not a first key, or anything else looks unusual, the
    full parse takes over, so the result is always that of the full parse on well-formed input.
    Parts of the document that are never read are not validated.
    """
    at = text.find(_WARC_KEY)
    if at < 0:
        raise _NeedFullParse
    warc, _ = _DECODER.raw_decode(text, at + len(_WARC_KEY) - 1)
    if _warc_type(warc) != "response":
        return None
    html = text.find(_HTML_KEY)
    links = text.find(_LINKS_KEY, html) if html >= 0 else -1
    if links < 0:
        raise _NeedFullParse
    head_at = text.find(_HEAD_KEY, html)
    head, head_end = ({}, head_at) if head_at < 0 else _DECODER.raw_decode(text, head_at + len(_HEAD_KEY) - 1)
    # Skip the <head> (its <meta> attribute maps could spell anything) when it follows Links.
    skip_from, skip_to = (head_at, head_end) if head_at > links else (-1, -1)
    images: list[Any] = []
    pos = links
    while (found := text.find(_IMG_OBJECT, pos)) >= 0:
        if skip_from <= found < skip_to:
            pos = skip_to
            continue
        link, pos = _DECODER.raw_decode(text, found)
        images.append(link)
    pairs = text.count(_IMG_SRC_PAIR, links)
    any_img = text.count(_IMG_ANY_PAIR, links)
    if skip_from >= 0:
        pairs -= text.count(_IMG_SRC_PAIR, skip_from, skip_to)
        any_img -= text.count(_IMG_ANY_PAIR, skip_from, skip_to)
    if pairs != len(images):
        raise _NeedFullParse
    page_url = first_value(warc.get("WARC-Target-URI"))
    if not page_url:
        raise KeyError("WARC-Target-URI")
    return _Page(page_url, first_value(warc.get("WARC-Date")) or "", first_value(head.get("Base")) or "",
                 images, any_img - pairs, 0)


def _read_page_full(doc: Any) -> _Page | None:
    """The page of a fully decoded WAT document (the reference the targeted reader must agree with)."""
    warc = _path(doc, "Envelope", "WARC-Header-Metadata")
    if not isinstance(warc, dict):
        raise KeyError("Envelope.WARC-Header-Metadata")
    if _warc_type(warc) != "response":
        return None
    html = _object_at(doc, "Envelope", "Payload-Metadata", "HTTP-Response-Metadata", "HTML-Metadata")
    links = _object_at(html, "Links")
    if links is None:
        return None
    if not isinstance(links, list):
        raise KeyError("HTML-Metadata.Links")
    page_url = first_value(warc.get("WARC-Target-URI"))
    if not page_url:
        raise KeyError("WARC-Target-URI")
    images: list[Any] = []
    other_img = bad_links = 0
    for link in links:
        if not isinstance(link, dict):
            bad_links += 1
            continue
        kind = link.get("path")
        if kind == _IMG_SRC_PATH:
            images.append(link)
        elif isinstance(kind, str) and kind.startswith("IMG@"):
            other_img += 1
    base = first_value(_path(html, "Head", "Base")) or ""
    return _Page(page_url, first_value(warc.get("WARC-Date")) or "", base, images, other_img, bad_links)


def _warc_type(warc: dict[str, Any]) -> str:
    """The record's WARC-Type; KeyError when it is missing or not a string (a malformed record)."""
    kind = first_value(warc.get("WARC-Type"))
    if kind is None:
        raise KeyError("WARC-Type")
    return kind


def _path(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _object_at(doc: Any, *keys: str) -> Any:
    """`doc[key1][key2]…`; None when a key is missing (or null), KeyError when a value on the way is not an
    object: a response whose metadata has the wrong shape is a malformed record, not a page without links."""
    for key in keys:
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise KeyError(key)
        doc = doc.get(key)
    return doc


def extract_pairs(
    wat_paths: Sequence[str],
    *,
    crawl: str,
    segment: str,
    config: ExtractConfig = ExtractConfig(),  # frozen, so one shared default is safe
    exclude_uids: Collection[int] | None = None,
    blocklist: CrawlBlocklist | None = None,
) -> ExtractResult:
    """Extract LAION-style image-text pairs from WAT files, in file order.

    Pairs are deduplicated on (url, text) across all files of the call (the first occurrence wins) and
    against `exclude_uids`, the uids already materialised by earlier partitions (a set is used as is;
    any other collection is copied into one). A pair the takedown `blocklist` refuses (its uid, URL, host or a
    caption rule) is not stored, counted under `takedown`. Returns the `records.PAIRS_COLUMNS` table and counts by
    reason, in total and per file: "records" (WARC records read), "pages" (responses with links),
    "image_links" (`IMG@/src` entries), "kept", and every reason of INPUT_REASONS and DROP_REASONS.
    Hostile input never raises: every record that cannot be used is counted under one reason, and the
    pairs around it are kept. Raises `WatReadError` for a file that cannot be read at all.
    """
    excluded = exclude_uids if isinstance(exclude_uids, set | frozenset) else set(exclude_uids or ())
    extraction = _Extraction(config, excluded, None if blocklist is None or blocklist.empty else blocklist)
    per_file: dict[str, dict[str, int]] = {}
    bytes_read = 0
    for wat_path in wat_paths:
        counts, file_bytes = extraction.add_file(wat_path)
        bytes_read += file_bytes
        previous = per_file.get(wat_path)  # a file named twice: its counts add up
        per_file[wat_path] = counts if previous is None else {k: previous[k] + v for k, v in counts.items()}
    totals = _zero_counts()
    for file_counts in per_file.values():
        for name, n in file_counts.items():
            totals[name] += n
    return ExtractResult(table=extraction.table(crawl, segment), counts=totals, per_file=per_file,
                         bytes_read=bytes_read)


def _zero_counts() -> dict[str, int]:
    """Every count an extraction reports, at zero, in the order stats files list them."""
    return dict.fromkeys((*TOTALS, *INPUT_REASONS, *DROP_REASONS), 0)


def _record_page(payload: bytes, counts: dict[str, int]) -> _Page | None:
    """The page of one record's payload if it has image links to count; a record that cannot be read is
    counted under its reason in `counts` and gives None."""
    if _IMG_MARKER not in payload:  # LAION's pre-filter: no <img>, nothing to decode
        return None
    try:
        page = _read_page(payload.decode("utf-8"))
    except UnicodeError:  # not UTF-8, or a page URL/date with a lone surrogate
        counts[R.BAD_ENCODING] += 1
        return None
    except ValueError:
        counts[R.BAD_JSON] += 1
        return None
    except RecursionError:  # the json module recurses per nesting level
        counts[R.JSON_TOO_DEEP] += 1
        return None
    except KeyError:
        counts[R.BAD_RECORD] += 1
        return None
    if page is None or not (page.images or page.other_img or page.bad_links):
        return None
    return page


class _Extraction:
    """The state of one `extract_pairs` call: the kept pairs' columns and every (url, text) seen so far."""

    def __init__(self, config: ExtractConfig, excluded: Collection[int], blocklist: CrawlBlocklist | None = None
                 ) -> None:
        self.config = config
        self.excluded = excluded
        self.refuse = blocklist.refuse_pair if blocklist is not None else None
        self.seen: set[tuple[str, str]] = set()
        self.cols: dict[str, list[Any]] = {name: [] for name in R.PAIRS_COLUMNS}

    def add_file(self, wat_path: str) -> tuple[dict[str, int], int]:
        """Add the pairs of one WAT file; returns its counts by reason and the compressed bytes read."""
        counts = _zero_counts()
        reader = WatReader(wat_path, max_record_bytes=self.config.max_record_bytes)
        for record in reader:
            page = _record_page(record.payload, counts)
            if page is not None:
                self._add_page(page, wat_path, record.offset, counts)
        counts["records"] = reader.records
        for reason, n in reader.problems.items():
            counts[reason] += n
        return counts, reader.bytes_read

    def _add_page(self, page: _Page, wat_path: str, offset: int, counts: dict[str, int]) -> None:
        """Apply the link rules to one page's image links and append the pairs kept, counting each drop."""
        counts["pages"] += 1
        counts[R.DROP_NOT_IMAGE_LINK] += page.other_img
        counts[R.BAD_RECORD] += page.bad_links
        counts["image_links"] += len(page.images)
        # The loop below runs once per <img>, the hottest code of extraction: its state lives in locals and
        # its rules stay inline, since a function call per link would cost more than most of the rules.
        config, seen, excluded, cols, refuse = self.config, self.seen, self.excluded, self.cols, self.refuse
        uids, urls, texts, pages = cols[R.UID], cols[R.URL], cols[R.TEXT], cols[R.PAGE_URL]
        files, offsets, dates = cols[R.WAT_FILE], cols[R.WAT_RECORD], cols[R.WARC_DATE]
        page_url, base = page.url, page.base
        for link in page.images:
            raw_url = link.get("url") if isinstance(link, dict) else None
            if not isinstance(raw_url, str):
                counts[R.BAD_RECORD] += 1
                continue
            # The alt test first: most <img> have none, and it is cheaper than resolving the URL.
            raw_alt = link.get("alt")
            text = clean_alt(raw_alt, config) if isinstance(raw_alt, str) else None
            if text is None:
                counts[R.DROP_SHORT_ALT] += 1
                continue
            url, reason = resolve_image_url(page_url, base, raw_url, config)
            if url is None:
                counts[reason or R.BAD_RECORD] += 1
                continue
            pair = (url, text)
            if pair in seen:
                counts[R.DROP_DUPLICATE] += 1
                continue
            seen.add(pair)
            uid = laion_uid(url, text)
            if uid in excluded:
                counts[R.DROP_SEEN_BEFORE] += 1
                continue
            if refuse is not None and refuse(uid, url, text) is not None:
                counts[R.DROP_TAKEDOWN] += 1
                continue
            uids.append(uid)
            urls.append(url)
            texts.append(text)
            pages.append(page_url)
            files.append(wat_path)
            offsets.append(offset)
            dates.append(page.date)
            counts["kept"] += 1

    def table(self, crawl: str, segment: str) -> pa.Table:
        """The kept pairs as a PAIRS_SCHEMA table, with each caption's language detected."""
        cols = dict(self.cols)
        texts = cols[R.TEXT]
        languages = [detect_language(text, self.config) for text in texts]
        cols[R.LANGUAGE] = [code for code, _ in languages]
        cols[R.LANGUAGE_SCORE] = [score for _, score in languages]
        cols[R.CRAWL] = [crawl] * len(texts)
        cols[R.SEGMENT] = [segment] * len(texts)
        return pa.Table.from_pydict(cols, schema=PAIRS_SCHEMA)
