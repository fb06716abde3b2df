"""Takedown lists and the lake's persistent blocklist: entry kinds, list files, and what every stage reads.

A takedown list is a file of entries, each one kind and one value:

| kind | value | matches |
|---|---|---|
| `url` | an image URL | the pair's `url`, exactly (stored as its sha256: the blocklist never holds URLs in clear) |
| `url_sha256` | 64 hex digits | sha256 of the pair's `url` (UTF-8) |
| `image_sha256` | 64 hex digits | sha256 of the downloaded original bytes (`downloads.sha256`) |
| `image_md5` | 32 hex digits | md5 of the downloaded original bytes (`downloads.md5`, PhotoDNA-free lists use it) |
| `phash` | 16 hex digits, `radius` bits (default 0) | the stored image's pHash within `radius` (re-encoded copies) |
| `host` | a host or domain | the image URL's (or its final URL's) host, or any subdomain of it |
| `uid` | a lake uid (signed int64, or its unsigned spelling) | that pair |
| `caption_keyword` | a word or phrase, case-insensitive, whole words | the caption; with `min_punsafe`, when >= it |
| `caption_regex` | a Python regular expression, case-insensitive | the caption (search), `min_punsafe` as above |

List files (`curation takedown add FILE --list NAME --reason TEXT`, or dropped into `<lake>/takedowns/inbox/`):
CSV with a header holding `kind` and `value` (and optionally `radius`, `min_punsafe`); JSON lines with those keys;
or text, one `kind value [radius=N] [min_punsafe=X]` per line (`#` comments; a `# reason: TEXT` line sets the
reason of an inbox file). With a default kind (`--kind image_md5`) a text line is just the value: the shape of the
hash lists child-safety organisations share. A list with any invalid line is refused whole, every bad line named:
a half-ingested takedown list is worse than none.

The store under `<lake>/takedowns/` is append-only: each ingested list is a new `lists/<seq>-<name>.parquet` (the
validated entries with list, reason and when) plus its `.json` record; nothing is ever rewritten or deleted there.
`taken_down.parquet` holds every matched lake row (uid, partition, list, kind, the sha256 of its URL and its host,
when), cumulative: a uid once taken down stays taken down even after its URL and caption left the lake.
"""

from __future__ import annotations

import csv
import hashlib
import io as stdio
import ipaddress
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import io
from curation import records as R
from curation.layout import Lake, join

KIND_URL = "url"
KIND_URL_SHA256 = "url_sha256"
KIND_IMAGE_SHA256 = "image_sha256"
KIND_IMAGE_MD5 = "image_md5"
KIND_PHASH = "phash"
KIND_HOST = "host"
KIND_UID = "uid"
KIND_CAPTION_KEYWORD = "caption_keyword"
KIND_CAPTION_REGEX = "caption_regex"
KINDS = (KIND_URL, KIND_URL_SHA256, KIND_IMAGE_SHA256, KIND_IMAGE_MD5, KIND_PHASH, KIND_HOST, KIND_UID,
         KIND_CAPTION_KEYWORD, KIND_CAPTION_REGEX)
CAPTION_KINDS = (KIND_CAPTION_KEYWORD, KIND_CAPTION_REGEX)

MAX_RADIUS = 16  # pHash bits; beyond ~12 of 64 unrelated images start to match
MAX_PATTERN = 1_000  # characters of a caption rule
LIST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

TAKEDOWNS_DIR = "takedowns"
INBOX_DIR = "inbox"
REFUSED_DIR = "refused"  # inbox files that are not a valid list move here, with why
LISTS_DIR = "lists"
TAKEN_DOWN_FILE = "taken_down.parquet"
PROPAGATION_FILE = "propagation.json"

# Columns of an ingested list's entries and of taken_down.parquet.
LIST = "list"
KIND = "kind"
VALUE = "value"
RADIUS = "radius"
MIN_PUNSAFE = "min_punsafe"
LINE = "line"
ADDED_UNIX = "added_unix"
URL_SHA256 = "url_sha256"
HOST = "host"
MATCHED_UNIX = "matched_unix"
ENTRY_SCHEMA = pa.schema([(LIST, pa.string()), (R.REASON, pa.string()), (ADDED_UNIX, pa.float64()),
                          (KIND, pa.string()), (VALUE, pa.string()), (RADIUS, pa.int32()),
                          (MIN_PUNSAFE, pa.float64()), (LINE, pa.int32())])
TAKEN_DOWN_SCHEMA = pa.schema([(R.UID, pa.int64()), (R.CRAWL, pa.string()), (R.SEGMENT, pa.string()),
                               (LIST, pa.string()), (KIND, pa.string()), (URL_SHA256, pa.string()),
                               (HOST, pa.string()), (MATCHED_UNIX, pa.float64())])


def takedown_reason(list_name: str) -> str:
    """The status reason a row blocked or removed by a list carries: `takedown:<list>`."""
    return f"{R.REASON_TAKEDOWN_PREFIX}{list_name}"


def url_sha256(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def url_host(url: str | None) -> str | None:
    """The lowercase host of a URL without a trailing dot (None when it has none)."""
    if not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host.rstrip(".").lower() if host else None


def host_matches(host: str | None, blocked: frozenset[str]) -> str | None:
    """The blocked domain `host` is or lies under (`cdn.example.com` under `example.com`), else None."""
    if not host or not blocked:
        return None
    if _is_ip(host):  # an address matches itself only: no "subdomains" of 127.0.0.2
        return host if host in blocked else None
    labels = host.split(".")
    for i in range(len(labels)):
        suffix = ".".join(labels[i:])
        if suffix in blocked:
            return suffix
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ list files


class ListError(ValueError):
    """A takedown list that cannot be ingested: the message names the file and every bad line."""


@dataclass(frozen=True)
class Entry:
    kind: str
    value: str
    radius: int | None = None
    min_punsafe: float | None = None
    line: int = 0


def _hex(value: str, digits: int, what: str) -> str:
    v = value.strip().lower()
    if len(v) != digits or any(c not in "0123456789abcdef" for c in v):
        raise ValueError(f"{what} must be {digits} hex digits, got {value!r}")
    return v


def _host(value: str) -> str:
    v = value.strip().rstrip(".").lower()
    if "://" in v:
        v = url_host(v) or ""
    try:
        v = v.encode("idna").decode("ascii") if v else v
    except UnicodeError:
        raise ValueError(f"not a host name: {value!r}") from None
    if not v or any(c in v for c in "/@: ") or ".." in v:
        raise ValueError(f"not a host name: {value!r}")
    return v


def _uid(value: str) -> str:
    v = int(value.strip())
    if v >= 1 << 63:
        v -= 1 << 64  # the unsigned spelling (clip-retrieval's JSON ids) of a negative int64
    if not -(1 << 63) <= v < 1 << 63:
        raise ValueError(f"uid out of int64 range: {value!r}")
    return str(v)


def normalize(entry: Entry) -> Entry:
    """The entry as the store holds it (URLs become url_sha256; hex lowercased; hosts IDNA); ValueError if invalid."""
    kind, value = entry.kind.strip().lower(), entry.value
    if kind not in KINDS:
        raise ValueError(f"unknown kind {entry.kind!r} (one of {', '.join(KINDS)})")
    radius, floor = entry.radius, entry.min_punsafe
    if radius is not None and kind != KIND_PHASH:
        raise ValueError("radius applies to phash entries only")
    if floor is not None and kind not in CAPTION_KINDS:
        raise ValueError("min_punsafe applies to caption entries only")
    if floor is not None and not 0.0 <= floor <= 1.0:
        raise ValueError(f"min_punsafe must be in [0, 1], got {floor}")
    if kind == KIND_URL:
        url = value.strip()
        if not url or any(c in url for c in "\r\n"):
            raise ValueError("empty url")
        return Entry(KIND_URL_SHA256, url_sha256(url), line=entry.line)
    if kind == KIND_URL_SHA256:
        value = _hex(value, 64, "url_sha256")
    elif kind == KIND_IMAGE_SHA256:
        value = _hex(value, 64, "image_sha256")
    elif kind == KIND_IMAGE_MD5:
        value = _hex(value, 32, "image_md5")
    elif kind == KIND_PHASH:
        value = _hex(value, 16, "phash")
        radius = 0 if radius is None else radius
        if not 0 <= radius <= MAX_RADIUS:
            raise ValueError(f"radius must be in [0, {MAX_RADIUS}], got {radius}")
    elif kind == KIND_HOST:
        value = _host(value)
    elif kind == KIND_UID:
        value = _uid(value)
    else:
        value = value.strip()
        if not value or len(value) > MAX_PATTERN:
            raise ValueError(f"a caption rule must have 1-{MAX_PATTERN} characters")
        try:
            re.compile(_caption_pattern(kind, value))
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return Entry(kind, value, radius, floor, entry.line)


def _caption_pattern(kind: str, value: str) -> str:
    if kind == KIND_CAPTION_KEYWORD:
        return r"(?<!\w)" + r"\s+".join(re.escape(w) for w in value.split()) + r"(?!\w)"
    return value


def _optional_number(text: str | None, cast: type) -> Any:
    text = (text or "").strip()
    return cast(text) if text else None


def _text_line(line: str, number: int, default_kind: str | None) -> Entry:
    if default_kind is not None:
        return Entry(default_kind, line.strip(), line=number)
    kind, _, rest = line.strip().partition(" ")
    words = rest.strip().split(" ") if kind in (KIND_URL, KIND_URL_SHA256, KIND_IMAGE_SHA256, KIND_IMAGE_MD5,
                                                 KIND_PHASH, KIND_HOST, KIND_UID) else [rest.strip()]
    options: dict[str, str] = {}
    value_words = []
    for word in words:
        key, eq, val = word.partition("=")
        if eq and key in (RADIUS, MIN_PUNSAFE):
            options[key] = val
        else:
            value_words.append(word)
    if kind in CAPTION_KINDS:  # a caption rule may hold spaces; a trailing min_punsafe=X is the option
        m = re.match(r"^(.*?)\s+min_punsafe=(\S+)$", rest.strip())
        value_words, options = ([m.group(1)], {MIN_PUNSAFE: m.group(2)}) if m else ([rest.strip()], {})
    if not value_words or len(value_words) > 1:
        raise ValueError("expected `kind value [radius=N] [min_punsafe=X]`")
    return Entry(kind, value_words[0], _optional_number(options.get(RADIUS), int),
                 _optional_number(options.get(MIN_PUNSAFE), float), number)


def parse_list(data: bytes, name: str, *, default_kind: str | None = None) -> tuple[list[Entry], str | None]:
    """The validated entries of a list file (format from its name: .csv, .jsonl/.ndjson, else text) and the reason
    its `# reason:` line gives (text files). ListError naming every bad line (up to 20) when any is invalid."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ListError(f"{name}: not UTF-8 text ({exc})") from None
    if default_kind is not None and default_kind not in KINDS:
        raise ListError(f"unknown kind {default_kind!r} (one of {', '.join(KINDS)})")
    raw: list[Entry | tuple[int, str]] = []  # entries, or (line, problem)
    reason = None
    suffix = os.path.splitext(name.lower())[1]
    if suffix == ".csv":
        reader = csv.DictReader(stdio.StringIO(text))
        fields = set(reader.fieldnames or ())
        if VALUE not in fields or (KIND not in fields and default_kind is None):
            raise ListError(f"{name}: a CSV list needs a header with `kind` and `value` columns, got "
                            f"{sorted(fields)}")
        for number, row in enumerate(reader, start=2):
            try:
                raw.append(Entry(row.get(KIND) or default_kind or "", row.get(VALUE) or "",
                                 _optional_number(row.get(RADIUS), int), _optional_number(row.get(MIN_PUNSAFE), float),
                                 number))
            except ValueError as exc:
                raw.append((number, str(exc)))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped.lower().startswith("# reason:"):
                reason = stripped.split(":", 1)[1].strip() or None
                continue
            if not stripped or stripped.startswith("#"):
                continue
            try:
                if suffix in (".jsonl", ".ndjson"):
                    obj = json.loads(stripped)
                    if not isinstance(obj, dict):
                        raise ValueError("a JSON line must be an object with kind and value")
                    raw.append(Entry(str(obj.get(KIND) or default_kind or ""), str(obj.get(VALUE) or ""),
                                     None if obj.get(RADIUS) is None else int(obj[RADIUS]),
                                     None if obj.get(MIN_PUNSAFE) is None else float(obj[MIN_PUNSAFE]), number))
                else:
                    raw.append(_text_line(stripped, number, default_kind))
            except ValueError as exc:
                raw.append((number, str(exc)))
    entries, problems = [], []
    for item in raw:
        if isinstance(item, tuple):
            problems.append(item)
            continue
        try:
            entries.append(normalize(item))
        except ValueError as exc:
            problems.append((item.line, str(exc)))
    if problems:
        shown = "; ".join(f"line {n}: {p}" for n, p in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise ListError(f"{name}: {len(problems)} invalid entr{'y' if len(problems) == 1 else 'ies'}, nothing "
                        f"ingested: {shown}{more}")
    if not entries:
        raise ListError(f"{name}: no entries")
    return entries, reason


def check_list_name(name: str) -> str:
    if not LIST_NAME.match(name):
        raise ListError(f"list name {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting with a letter or "
                        "digit)")
    return name


# ------------------------------------------------------------------------------------------------- the store


def takedowns_dir(lake_root: str) -> str:
    return join(Lake(lake_root).root, TAKEDOWNS_DIR)


def inbox_dir(lake_root: str) -> str:
    return join(takedowns_dir(lake_root), INBOX_DIR)


def taken_down_path(lake_root: str) -> str:
    return join(takedowns_dir(lake_root), TAKEN_DOWN_FILE)


@dataclass(frozen=True)
class ListRecord:
    """One ingested list (its `.json` beside the entries parquet)."""

    seq: int
    name: str
    reason: str
    source: str  # the file name it came from
    content_sha256: str
    entries: int
    by_kind: dict[str, int]
    ingested_unix: float

    @property
    def stem(self) -> str:
        return f"{self.seq:06d}-{self.name}"


def list_records(lake_root: str) -> list[ListRecord]:
    """Every ingested list, oldest first."""
    fs, root = io.filesystem(join(takedowns_dir(lake_root), LISTS_DIR))
    if not fs.exists(root):
        return []
    out = []
    for path in sorted(str(p) for p in fs.ls(root, detail=False)):
        base = path.rsplit("/", 1)[-1]
        if base.endswith(".json") and not base.startswith("."):
            with fs.open(path, "rb") as f:
                out.append(ListRecord(**json.loads(f.read())))
    return sorted(out, key=lambda r: r.seq)


def store_list(lake_root: str, entries: Sequence[Entry], *, name: str, reason: str, source: str,
               content_sha256: str) -> tuple[ListRecord, bool]:
    """Append a validated list to the store: (its record, whether it is new). The same content under the same name
    is ingested once (an inbox file dropped twice, a rerun)."""
    check_list_name(name)
    for rec in list_records(lake_root):
        if rec.name == name and rec.content_sha256 == content_sha256:
            return rec, False
    records = list_records(lake_root)
    now = round(time.time(), 3)
    by_kind: dict[str, int] = {}
    for e in entries:
        by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
    record = ListRecord(seq=(records[-1].seq + 1) if records else 1, name=name, reason=reason, source=source,
                        content_sha256=content_sha256, entries=len(entries), by_kind=dict(sorted(by_kind.items())),
                        ingested_unix=now)
    lists_dir = join(takedowns_dir(lake_root), LISTS_DIR)
    table = pa.table({
        LIST: [name] * len(entries), R.REASON: [reason] * len(entries), ADDED_UNIX: [now] * len(entries),
        KIND: [e.kind for e in entries], VALUE: [e.value for e in entries], RADIUS: [e.radius for e in entries],
        MIN_PUNSAFE: [e.min_punsafe for e in entries], LINE: [e.line for e in entries],
    }, schema=ENTRY_SCHEMA)
    io.write_parquet(table, join(lists_dir, f"{record.stem}.parquet"))
    io.write_json(record.__dict__, join(lists_dir, f"{record.stem}.json"))  # the record last: it commits the list
    return record, True


def entries(lake_root: str) -> pa.Table:
    """Every entry of every ingested list (ENTRY_SCHEMA), oldest list first."""
    lists_dir = join(takedowns_dir(lake_root), LISTS_DIR)
    tables = []
    for rec in list_records(lake_root):
        fs, p = io.filesystem(join(lists_dir, f"{rec.stem}.parquet"))
        tables.append(pq.read_table(p, filesystem=fs).cast(ENTRY_SCHEMA))
    return pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()


def taken_down(lake_root: str) -> pa.Table:
    """Every lake row taken down so far (TAKEN_DOWN_SCHEMA, one row per uid)."""
    path = taken_down_path(lake_root)
    if not io.exists(path):
        return TAKEN_DOWN_SCHEMA.empty_table()
    fs, p = io.filesystem(path)
    return pq.read_table(p, filesystem=fs).cast(TAKEN_DOWN_SCHEMA)


def taken_down_lists(lake_root: str, uids: Iterable[int]) -> dict[int, str]:
    """uid -> the list that took it down, for those of `uids` that were."""
    wanted = [int(u) for u in uids]
    if not wanted:
        return {}
    table = taken_down(lake_root)
    hit = table.filter(pc.is_in(table.column(R.UID), value_set=pa.array(wanted, pa.int64())))
    return dict(zip(hit.column(R.UID).to_pylist(), hit.column(LIST).to_pylist(), strict=True))


class BlockedUids:
    """The taken-down uids of a lake (sorted int64), re-read whenever taken_down.parquet changes: one stat per call,
    so a reader (the search service) honours a list from the moment it is ingested."""

    def __init__(self, lake_root: str) -> None:
        self.lake_root = lake_root
        self.path = taken_down_path(lake_root)
        self._stamp: tuple[Any, ...] | None = None
        self._uids = np.zeros(0, np.int64)
        self._lists: dict[int, str] = {}
        self.version = 0

    def _current_stamp(self) -> tuple[Any, ...] | None:
        fs, p = io.filesystem(self.path)
        try:
            info = fs.info(p)
        except FileNotFoundError:
            return None
        return (info.get("mtime"), info.get("size"), info.get("ino"))

    def refresh(self) -> np.ndarray:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            table = taken_down(self.lake_root) if stamp is not None else TAKEN_DOWN_SCHEMA.empty_table()
            uids = table.column(R.UID).to_numpy().astype(np.int64)
            self._lists = dict(zip(uids.tolist(), table.column(LIST).to_pylist(), strict=True))
            self._uids = np.unique(uids)
            self._stamp = stamp
            self.version += 1
        return self._uids

    def list_of(self, uid: int) -> str | None:
        """The list that took `uid` down (after `refresh`), or None."""
        self.refresh()
        return self._lists.get(int(uid))


# ------------------------------------------------------------------------------------------- crawl-time checks


@dataclass(frozen=True)
class CrawlBlocklist:
    """What later crawls refuse: built from every ingested list plus the URLs of rows already taken down (a URL
    whose image matched a blocked hash is never fetched again). Picklable: img2dataset's workers get a copy.

    `refuse_pair` is checked at extraction and before a download, `refuse_image` on the downloaded original bytes
    (sha256, md5) and on the stored image's pHash, before any byte is written."""

    url_sha256: Mapping[str, str] = field(default_factory=dict)  # digest -> list
    hosts: Mapping[str, str] = field(default_factory=dict)  # domain -> list
    uids: Mapping[int, str] = field(default_factory=dict)
    captions: tuple[tuple[str, str, str], ...] = ()  # (list, kind, pattern) of caption rules without a punsafe floor
    image_sha256: Mapping[str, str] = field(default_factory=dict)
    image_md5: Mapping[str, str] = field(default_factory=dict)
    phash: tuple[tuple[int, int, str], ...] = ()  # (hash as uint64 int, radius, list)
    # Derived once (a pair or an image is checked against all of them per call, vectorised for pHashes).
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)
    _captions: tuple[tuple[str, re.Pattern[str]], ...] = field(init=False, repr=False, compare=False)
    _phash_values: np.ndarray = field(init=False, repr=False, compare=False)
    _phash_radii: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hosts", frozenset(self.hosts))
        object.__setattr__(self, "_captions", tuple((name, re.compile(_caption_pattern(kind, pattern), re.IGNORECASE))
                                                    for name, kind, pattern in self.captions))
        object.__setattr__(self, "_phash_values", np.array([h for h, _, _ in self.phash], dtype=np.uint64))
        object.__setattr__(self, "_phash_radii", np.array([r for _, r, _ in self.phash], dtype=np.int64))

    @property
    def empty(self) -> bool:
        return not (self.url_sha256 or self.hosts or self.uids or self.captions or self.has_image_rules)

    @property
    def has_image_rules(self) -> bool:
        return bool(self.image_sha256 or self.image_md5 or self.phash)

    def refuse_pair(self, uid: int | None, url: str | None, text: str | None) -> str | None:
        """The list that blocks this pair (by uid, URL, host or caption rule), or None."""
        if uid is not None and int(uid) in self.uids:
            return self.uids[int(uid)]
        if url:
            hit = self.url_sha256.get(url_sha256(url))
            if hit is not None:
                return hit
            domain = host_matches(url_host(url), self._hosts)
            if domain is not None:
                return self.hosts[domain]
        if text:
            for name, compiled in self._captions:
                if compiled.search(text):
                    return name
        return None

    def refuse_image(self, sha256: str | None = None, md5: str | None = None, phash: int | None = None
                     ) -> str | None:
        """The list that blocks an image by its bytes' sha256/md5 or its pHash (within the entry's radius)."""
        if sha256 is not None and sha256 in self.image_sha256:
            return self.image_sha256[sha256]
        if md5 is not None and md5 in self.image_md5:
            return self.image_md5[md5]
        if phash is not None and self.phash:
            value = np.uint64(int(phash) & ((1 << 64) - 1))
            near = np.flatnonzero(np.bitwise_count(self._phash_values ^ value) <= self._phash_radii)
            if near.size:
                return self.phash[int(near[0])][2]
        return None


@dataclass
class Rules:
    """Every ingested entry by kind, as matchers read them; `rank` orders lists (oldest first) for ties."""

    rank: dict[str, int]
    exact: dict[str, dict[Any, str]]  # url_sha256 / image_sha256 / image_md5 / uid -> value -> list (first list wins)
    hosts: dict[str, str]
    phash: list[tuple[int, int, str]]  # (hash as uint64 int, radius, list)
    captions: list[tuple[str, str, str, re.Pattern[str], float | None]]  # list, kind, value, compiled, floor

    @classmethod
    def of(cls, lake_root: str) -> Rules:
        records = list_records(lake_root)
        rules = cls({r.name: i for i, r in enumerate(records)}, {k: {} for k in KINDS}, {}, [], [])
        for row in entries(lake_root).to_pylist():
            kind, value, name = row[KIND], row[VALUE], row[LIST]
            if kind == KIND_HOST:
                rules.hosts.setdefault(value, name)
            elif kind == KIND_PHASH:
                rules.phash.append((int(value, 16), int(row[RADIUS] or 0), name))
            elif kind in CAPTION_KINDS:
                pattern = re.compile(_caption_pattern(kind, value), re.IGNORECASE)
                rules.captions.append((name, kind, value, pattern, row[MIN_PUNSAFE]))
            else:
                rules.exact[kind].setdefault(int(value) if kind == KIND_UID else value, name)
        return rules


def crawl_blocklist(lake_root: str) -> CrawlBlocklist:
    """The lake's CrawlBlocklist: its Rules (caption rules with a punsafe floor need scores, so not at crawl time)
    plus the URLs and uids of every row already taken down. Empty when nothing was ingested."""
    if not list_records(lake_root) and not io.exists(taken_down_path(lake_root)):
        return CrawlBlocklist()
    rules = Rules.of(lake_root)
    urls, uids = dict(rules.exact[KIND_URL_SHA256]), dict(rules.exact[KIND_UID])
    done = taken_down(lake_root)
    for digest, uid, name in zip(done.column(URL_SHA256).to_pylist(), done.column(R.UID).to_pylist(),
                                 done.column(LIST).to_pylist(), strict=True):
        if digest:
            urls.setdefault(digest, name)
        uids.setdefault(int(uid), name)
    return CrawlBlocklist(url_sha256=urls, hosts=rules.hosts, uids=uids,
                          captions=tuple((n, k, v) for n, k, v, _, floor in rules.captions if floor is None),
                          image_sha256=rules.exact[KIND_IMAGE_SHA256], image_md5=rules.exact[KIND_IMAGE_MD5],
                          phash=tuple(rules.phash))
