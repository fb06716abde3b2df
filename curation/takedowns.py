"""Takedowns: ingest lists, match the whole lake without fetching anything, and propagate removals everywhere.

`ingest` validates a list (curation.blocklist), appends it to the lake's blocklist and matches it against the lake
at once: `taken_down.parquet` then names every hit, and from that moment the search service (which re-reads it on
every query) never returns one, nor its metadata or image. `propagate` then removes the samples from every place
they live, idempotently (a killed run is finished by the next one):

- the partition tables keep one row per pair (so counts along the lineage still agree) but a hit keeps only its
  uid, partition and status: `pairs` loses every other column (url, text, page, language, WAT file, record offset,
  date); `downloads` becomes status
  `taken_down` with reason `takedown:<list>` and nothing else; `clip` likewise, every score, pHash and model field
  null, and the image and text embedding rows zeroed (the npy files keep their shape, so each file's atomic
  replacement alone is consistent); each touched table is replaced atomically, its marker rewritten last with the
  count of rows taken down;
- the bytes: every tar member of a hit (`<key>.jpg/.txt/.json`) is rewritten out of the downloads shards and out
  of every subset release's webdataset shards (a new tar beside the old, then a rename), and the rows leave the
  shards' img2dataset parquet and every release's parquet parts;
- dedupe runs (incrementally: only the touched partitions are re-read, so a duplicate of a removed survivor becomes
  the survivor), then the index (a new generation without the uids; its metadata store with them gone);
- every subset whose latest release held a hit gets a new release at once, its diff saying `takedown:<list>`;
  older releases are scrubbed in place (release.json records what was removed and when).

Later crawls: extraction and downloads read `blocklist.crawl_blocklist`, which includes the URLs of every row taken
down here (a URL whose image matched a hash is never fetched again).
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import blocklist as B
from curation import io
from curation import records as R
from curation.hamming import HammingIndex
from curation.layout import EMBEDDING_FILES, UIDS_FILE, Lake, Partition, join

# Up to this many pHash entries a lake partition is compared with each directly; more go through HammingIndex.
BRUTE_FORCE_PHASH_ENTRIES = 32
# Columns a taken-down row keeps per table (everything else becomes null).
KEEP_COLUMNS = {
    "pairs": (R.UID, R.CRAWL, R.SEGMENT),
    "downloads": (R.UID, R.STATUS, R.REASON),
    "clip": (R.UID, R.STATUS, R.KEEP, R.REASON, R.CRAWL, R.SEGMENT),
}


# ------------------------------------------------------------------------------------------------------ ingest


@dataclass(frozen=True)
class IngestResult:
    """One list file ingested (or recognised as already ingested) and the rows it matched."""

    record: B.ListRecord
    new: bool
    matched: dict[str, int]  # kind -> rows newly taken down by this list
    match_seconds: float


def ingest(lake_root: str, data: bytes, *, name: str, reason: str | None, source: str,
           default_kind: str | None = None, fallback_reason: str | None = None) -> IngestResult:
    """Validate and append a list, then match the lake (writing taken_down.parquet before returning). The reason is
    `reason`, else the file's `# reason:` line, else `fallback_reason`.

    ListError (nothing stored) when any entry is invalid or no reason is given."""
    B.check_list_name(name)
    if io.is_local(lake_root) and not os.path.isdir(io.filesystem(lake_root)[1]):
        raise FileNotFoundError(f"no lake at {lake_root}")
    entries, file_reason = B.parse_list(data, source, default_kind=default_kind)
    why = (reason or file_reason or fallback_reason or "").strip()
    if not why:
        raise B.ListError(f"{source}: give a reason (--reason, or a `# reason: ...` line in the file)")
    record, new = B.store_list(lake_root, entries, name=name, reason=why, source=source,
                               content_sha256=hashlib.sha256(data).hexdigest())
    result = match_lake(lake_root)
    return IngestResult(record, new, result.by_list.get(name, {}), result.seconds)


def ingest_inbox(lake_root: str) -> list[IngestResult]:
    """Ingest every file in `<lake>/takedowns/inbox/` (list name = file name without suffix, reason from its
    `# reason:` line or `inbox`), then delete it: the store keeps its validated entries (URLs only as sha256) and its
    content's sha256, never the file. A refused file moves to `refused/` with a `.refused.txt` beside it saying why,
    and the ListError is re-raised after the others were ingested."""
    fs, inbox = io.filesystem(B.inbox_dir(lake_root))
    if not fs.exists(inbox):
        return []
    refused_dir = join(B.takedowns_dir(lake_root), B.REFUSED_DIR)
    out: list[IngestResult] = []
    refused: list[str] = []
    for path in sorted(str(p) for p in fs.ls(inbox, detail=False)):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(".") or fs.isdir(path):
            continue
        with fs.open(path, "rb") as f:
            data = f.read()
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(base)[0]).lstrip("._-") or "inbox"
        try:
            out.append(ingest(lake_root, data, name=stem[:64], reason=None, source=base, fallback_reason="inbox"))
        except B.ListError as exc:
            refused.append(str(exc))
            io.write_bytes(data, join(refused_dir, base))
            io.write_bytes(f"{exc}\n".encode(), join(refused_dir, f"{base}.refused.txt"))
        fs.rm(path)
    if refused:
        raise B.ListError("; ".join(refused))
    return out


# ------------------------------------------------------------------------------------------------------- match


@dataclass(frozen=True)
class MatchResult:
    new: pa.Table  # rows taken down by this run (TAKEN_DOWN_SCHEMA)
    total: int  # rows taken down so far
    by_list: dict[str, dict[str, int]]  # list -> kind -> new rows
    seconds: float




def _column(table: pa.Table | None, name: str, n: int) -> list[Any]:
    if table is None or name not in table.column_names:
        return [None] * n
    return table.column(name).to_pylist()


def _aligned(table: pa.Table | None, uids: np.ndarray) -> pa.Table | None:
    """`table`'s rows in the order of `uids` (pairs order); None when the stage is absent."""
    if table is None:
        return None
    pos = pc.index_in(pa.array(uids, pa.int64()), value_set=table.column(R.UID))
    return table.take(pc.fill_null(pos, 0)) if table.num_rows else None


def _read_stage(lake: Lake, stage: str, part: Partition, columns: Sequence[str]) -> pa.Table | None:
    if io.read_marker(lake.partition_dir(stage, part)) is None:
        return None
    fs, p = io.filesystem(lake.table(stage, part))
    present = set(pq.read_schema(p, filesystem=fs).names)
    return pq.read_table(p, columns=[c for c in columns if c in present], filesystem=fs)


def _phash_hits(hashes: list[int | None], rules: B.Rules) -> list[str | None]:
    out: list[str | None] = [None] * len(hashes)
    if not rules.phash:
        return out
    have = [i for i, h in enumerate(hashes) if h is not None]
    if not have:
        return out
    values = np.array([hashes[i] for i in have], dtype=np.int64).view(np.uint64)
    if len(rules.phash) <= BRUTE_FORCE_PHASH_ENTRIES:
        for blocked, radius, name in rules.phash:
            near = np.bitwise_count(np.bitwise_xor(values, np.uint64(blocked))) <= radius
            for j in np.flatnonzero(near).tolist():
                if out[have[j]] is None:
                    out[have[j]] = name
        return out
    for radius in sorted({r for _, r, _ in rules.phash}):  # a long hash list: multi-index hashing, per radius
        entries = [(i, h) for i, (h, r, _) in enumerate(rules.phash) if r == radius]
        index = HammingIndex(np.array([h for _, h in entries], dtype=np.uint64), [i for i, _ in entries])
        found = index.search(values, radius)
        for row, entry in zip(found.query.tolist(), found.ids.tolist(), strict=True):
            name = rules.phash[entry][2]
            if out[have[row]] is None or rules.rank[name] < rules.rank[str(out[have[row]])]:
                out[have[row]] = name
    return out


# The host of an absolute URL, for pyarrow's RE2 (vectorised over a column; urlsplit per row costs 30x more).
HOST_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^:/?#]*)"


def _hosts(urls: pa.ChunkedArray) -> pa.ChunkedArray:
    """Lowercase hosts without a trailing dot (null where a URL has none)."""
    found = pc.struct_field(pc.extract_regex(urls, HOST_PATTERN), "host")
    return pc.utf8_rtrim(pc.utf8_lower(found), characters=".")


def _host_hits(columns: Sequence[pa.ChunkedArray], rules: B.Rules, n: int) -> list[str | None]:
    """Per row, the blocked domain its URL's (or final URL's) host is or lies under. Decided once per distinct
    host (a lake holds far fewer hosts than rows), whatever the length of the host list."""
    out: list[str | None] = [None] * n
    if not rules.hosts:
        return out
    blocked = frozenset(rules.hosts)
    for column in columns:
        hosts = _hosts(column)
        decided = {h: B.host_matches(h, blocked) for h in pc.unique(hosts).drop_null().to_pylist()}
        hit = sorted(h for h, d in decided.items() if d is not None)
        if not hit:
            continue
        where = pc.index_in(hosts, value_set=pa.array(hit, pa.string())).to_pylist()
        for i, j in enumerate(where):
            if j is not None and out[i] is None:
                out[i] = decided[hit[j]]
    return out


def _caption_hits(texts: pa.ChunkedArray, punsafe: list[Any], rules: B.Rules) -> list[list[tuple[str, str]]]:
    """Per row, the (list, kind) of every caption rule it matches. Keyword rules are narrowed by a vectorised
    case-insensitive substring test first; regexes run on every caption (Python semantics, as written)."""
    out: list[list[tuple[str, str]]] = [[] for _ in range(len(texts))]
    for name, kind, value, pattern, floor in rules.captions:
        if kind == B.KIND_CAPTION_KEYWORD:  # every match contains each word of the phrase
            has_all = np.logical_and.reduce([pc.fill_null(pc.match_substring(texts, word, ignore_case=True), False)
                                            .to_numpy(zero_copy_only=False) for word in value.split()])
            rows = np.flatnonzero(has_all)
        else:
            rows = np.arange(len(texts))
        for i in rows.tolist():
            text = texts[i].as_py()
            if text and pattern.search(text) and (floor is None or (punsafe[i] is not None and punsafe[i] >= floor)):
                out[i].append((name, kind))
    return out


def _exact_hits(values: pa.ChunkedArray | pa.Array, table: Mapping[Any, str]) -> np.ndarray:
    if not table:
        return np.zeros(len(values), bool)
    keys = list(table)
    value_set = pa.array(keys, pa.int64() if isinstance(keys[0], int) else pa.string())
    return pc.fill_null(pc.is_in(values, value_set=value_set), False).to_numpy(zero_copy_only=False)


def _partition_hits(lake: Lake, part: Partition, rules: B.Rules, done: set[int]) -> list[dict[str, Any]]:
    """The rows of one partition some entry matches (first list wins, then the kind order of B.KINDS). Every kind is
    first decided vectorised over the columns; only candidate rows are looked at one by one."""
    pairs = _read_stage(lake, "pairs", part, (R.UID, R.URL, R.TEXT))
    if pairs is None or pairs.num_rows == 0:
        return []
    uids = pairs.column(R.UID).to_numpy()
    n = len(uids)
    downloads = _aligned(_read_stage(lake, "downloads", part, (R.UID, R.SHA256, R.MD5, R.FINAL_URL)), uids)
    clip = _aligned(_read_stage(lake, "clip", part, (R.UID, R.PHASH, R.PUNSAFE)), uids)
    urls = pairs.column(R.URL)
    empty = pa.chunked_array([pa.nulls(n, pa.string())])

    def col(table: pa.Table | None, name: str) -> pa.ChunkedArray:
        return table.column(name) if table is not None and name in table.column_names else empty

    url_list = urls.to_pylist()
    digests = [B.url_sha256(u) if u is not None else None for u in url_list] if rules.exact[B.KIND_URL_SHA256] \
        else None
    exact = {B.KIND_UID: _exact_hits(pairs.column(R.UID), rules.exact[B.KIND_UID]),
             B.KIND_IMAGE_SHA256: _exact_hits(col(downloads, R.SHA256), rules.exact[B.KIND_IMAGE_SHA256]),
             B.KIND_IMAGE_MD5: _exact_hits(col(downloads, R.MD5), rules.exact[B.KIND_IMAGE_MD5])}
    if digests is not None:
        exact[B.KIND_URL_SHA256] = _exact_hits(pa.array(digests, pa.string()), rules.exact[B.KIND_URL_SHA256])
    near = _phash_hits(_column(clip, R.PHASH, n), rules)
    hosts = _host_hits([urls, col(downloads, R.FINAL_URL)], rules, n)
    captions = _caption_hits(pairs.column(R.TEXT), _column(clip, R.PUNSAFE, n), rules)
    candidate = np.logical_or.reduce([*exact.values(), np.array([h is not None for h in near]),
                                      np.array([h is not None for h in hosts]), np.array([bool(c) for c in captions])])
    values = {B.KIND_UID: uids, B.KIND_IMAGE_SHA256: _column(downloads, R.SHA256, n),
              B.KIND_IMAGE_MD5: _column(downloads, R.MD5, n), B.KIND_URL_SHA256: digests}
    out = []
    for i in np.flatnonzero(candidate).tolist():
        uid = int(uids[i])
        if uid in done or url_list[i] is None:
            continue  # taken down before (its URL is gone from the lake)
        found = [(rules.exact[kind][values[kind][i]], kind) for kind, mask in exact.items() if mask[i]]
        if near[i] is not None:
            found.append((str(near[i]), B.KIND_PHASH))
        if hosts[i] is not None:
            found.append((rules.hosts[str(hosts[i])], B.KIND_HOST))
        found.extend(captions[i])
        name, kind = min(found, key=lambda h: (rules.rank.get(h[0], 1 << 30), B.KINDS.index(h[1])))
        out.append({R.UID: uid, R.CRAWL: part.crawl, R.SEGMENT: part.segment, B.LIST: name, B.KIND: kind,
                    B.URL_SHA256: digests[i] if digests is not None else B.url_sha256(url_list[i]),
                    B.HOST: hosts[i] if kind == B.KIND_HOST else None})
    return out


def match_lake(lake_root: str) -> MatchResult:
    """Match every ingested entry against every finished partition (pairs, downloads, clip tables: nothing is
    fetched) and append the new hits to taken_down.parquet (rewritten atomically; cumulative)."""
    started = time.perf_counter()
    lake = Lake(lake_root)
    before = B.taken_down(lake_root)
    done = set(before.column(R.UID).to_pylist())
    rules = B.Rules.of(lake_root)
    now = round(time.time(), 3)
    hits: list[dict[str, Any]] = []
    if rules.rank:
        for part in io.finished_partitions(lake.stage_dir("pairs")):
            hits.extend(_partition_hits(lake, part, rules, done))
    new = pa.Table.from_pylist([{**h, B.MATCHED_UNIX: now} for h in hits], schema=B.TAKEN_DOWN_SCHEMA)
    if new.num_rows:
        io.write_parquet(pa.concat_tables([before, new]), B.taken_down_path(lake_root))
    by_list: dict[str, dict[str, int]] = {}
    for h in hits:
        kinds = by_list.setdefault(h[B.LIST], {})
        kinds[h[B.KIND]] = kinds.get(h[B.KIND], 0) + 1
    return MatchResult(new, before.num_rows + new.num_rows, by_list, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------------- scrub


def _null_rows(table: pa.Table, hit: np.ndarray, keep: Sequence[str], set_values: Mapping[str, list[Any]]
               ) -> pa.Table:
    """`table` with every column outside `keep` null on the `hit` rows, and `set_values` (full columns) applied."""
    mask = pa.array(hit)
    columns = []
    names = list(table.column_names)
    for name in set_values:  # a column the table lacks (an older writer's) is added
        if name not in names:
            names.append(name)
            table = table.append_column(name, pa.array([None] * table.num_rows, pa.string() if name != R.KEEP
                                                       else pa.bool_()))
    for name in names:
        col = table.column(name)
        if name in set_values:
            col = pa.chunked_array([pa.array(set_values[name], col.type)])
        elif name not in keep:
            col = pc.if_else(mask, pa.scalar(None, col.type), col)
        columns.append(col)
    return pa.table(columns, names=names)


def _tar_without(path: str, drop: set[str]) -> int:
    """Rewrite a tar without the members whose key (name before the first '.') is in `drop`: a new tar beside it,
    then a rename. Returns the members removed (0: the file is left untouched)."""
    fs, p = io.filesystem(path)
    with fs.open(p, "rb") as f:
        data = f.read()
    kept = _io.BytesIO()
    removed = 0
    with tarfile.open(fileobj=_io.BytesIO(data)) as src, tarfile.open(fileobj=kept, mode="w") as out:
        for member in src.getmembers():
            if member.name.split("/")[-1].split(".", 1)[0] in drop:
                removed += 1
                continue
            extracted = src.extractfile(member) if member.isfile() else None
            out.addfile(member, extracted)
    if removed:
        io.write_bytes(kept.getvalue(), path)
    return removed


def _parquet_without(path: str, column: str, drop: Sequence[Any]) -> int:
    fs, p = io.filesystem(path)
    table = pq.read_table(p, filesystem=fs)
    if column not in table.column_names or not drop:
        return 0
    hit = pc.fill_null(pc.is_in(table.column(column), value_set=pa.array(list(drop))), False)
    removed = int(pc.sum(hit).as_py() or 0)
    if removed:
        io.write_parquet(table.filter(pc.invert(hit)), path)
    return removed


@dataclass
class ScrubCounts:
    """What left the lake: rows emptied per table, tar members, embedding rows, release rows and files."""

    rows: Counter[str] = field(default_factory=Counter)
    shard_members: int = 0
    embedding_rows: int = 0
    release_rows: int = 0
    release_shard_members: int = 0
    partitions: list[str] = field(default_factory=list)


def _scrub_partition(lake: Lake, part: Partition, lists: Mapping[int, str], counts: ScrubCounts) -> None:
    """Empty the taken-down rows of one partition in every stage, and remove their image bytes and embeddings."""
    for stage in ("pairs", "downloads", "clip"):
        marker = io.read_marker(lake.partition_dir(stage, part))
        if marker is None:
            continue
        fs, p = io.filesystem(lake.table(stage, part))
        table = pq.read_table(p, filesystem=fs)
        uids = table.column(R.UID).to_numpy()
        hit = np.isin(uids, np.fromiter(lists, np.int64, len(lists)))
        if not hit.any():
            continue
        reasons = [B.takedown_reason(lists[u]) if h else r for u, h, r in
                   zip(uids.tolist(), hit.tolist(), _column(table, R.REASON, len(uids)), strict=True)]
        values: dict[str, list[Any]] = {}
        if stage != "pairs":
            values[R.STATUS] = [R.STATUS_TAKEN_DOWN if h else s
                                for h, s in zip(hit.tolist(), _column(table, R.STATUS, len(uids)), strict=True)]
            values[R.REASON] = reasons
        if stage == "clip":
            values[R.KEEP] = [False if h else k
                              for h, k in zip(hit.tolist(), _column(table, R.KEEP, len(uids)), strict=True)]
        if stage == "downloads":
            _scrub_shards(lake, part, table, hit, counts)
        if stage == "clip":
            counts.embedding_rows += _zero_embeddings(lake, part, set(uids[hit].tolist()))
        scrubbed = _null_rows(table, hit, KEEP_COLUMNS[stage], values)
        changed = int(hit.sum()) - _already(table, hit, stage)
        io.write_parquet(scrubbed, lake.table(stage, part))
        counts.rows[stage] += changed
        marker = {**marker, "taken_down": int(np.isin(uids, np.fromiter(lists, np.int64, len(lists))).sum())}
        if stage != "pairs":
            marker["by_status"] = dict(Counter(v for v in values[R.STATUS] if v is not None))
        if stage == "clip":
            marker["kept"] = sum(1 for k in values[R.KEEP] if k)
        io.write_marker(lake.partition_dir(stage, part), marker)
    _drop_dedupe_rows(lake, part, lists, counts)
    counts.partitions.append(part.key)


def _drop_dedupe_rows(lake: Lake, part: Partition, lists: Mapping[int, str], counts: ScrubCounts) -> None:
    """Remove the hits' dedupe rows (dedupe holds one row per kept clip row). `propagate` then re-runs dedupe
    from its state, which re-clusters (a duplicate of a removed survivor becomes the survivor)."""
    marker = io.read_marker(lake.partition_dir("dedupe", part))
    if marker is None:
        return
    removed = _parquet_without(lake.table("dedupe", part), R.UID, sorted(lists))
    if removed:
        counts.rows["dedupe"] += removed
        rows = pq.read_metadata(io.filesystem(lake.table("dedupe", part))[1]).num_rows
        io.write_marker(lake.partition_dir("dedupe", part), {**marker, "rows": rows})


def _already(table: pa.Table, hit: np.ndarray, stage: str) -> int:
    """Hit rows that an earlier (perhaps interrupted) scrub already emptied."""
    column = R.URL if stage == "pairs" else R.STATUS
    values = _column(table, column, table.num_rows)
    if stage == "pairs":
        return sum(1 for h, v in zip(hit.tolist(), values, strict=True) if h and v is None)
    return sum(1 for h, v in zip(hit.tolist(), values, strict=True) if h and v == R.STATUS_TAKEN_DOWN)


def _scrub_shards(lake: Lake, part: Partition, downloads: pa.Table, hit: np.ndarray, counts: ScrubCounts) -> None:
    shards, keys = downloads.column(R.SHARD).to_pylist(), downloads.column(R.KEY).to_pylist()
    by_shard: dict[str, set[str]] = {}
    for h, shard, key in zip(hit.tolist(), shards, keys, strict=True):
        if h and shard is not None and key is not None:
            by_shard.setdefault(shard, set()).add(key)
    base = lake.shards_dir(part)
    for shard, drop in sorted(by_shard.items()):
        tar = join(base, f"{shard}.tar")
        if io.exists(tar):
            counts.shard_members += _tar_without(tar, drop)
        meta = join(base, f"{shard}.parquet")
        if io.exists(meta):
            _parquet_without(meta, "key", sorted(drop))


def _zero_embeddings(lake: Lake, part: Partition, drop: set[int]) -> int:
    emb_dir = lake.embeddings_dir(part)
    uids_path = join(emb_dir, UIDS_FILE)
    if not io.exists(uids_path):
        return 0
    order = io.read_npy(uids_path).astype(np.int64)
    rows = np.flatnonzero(np.isin(order, np.fromiter(drop, np.int64, len(drop))))
    zeroed = 0
    for name in EMBEDDING_FILES.values():
        path = join(emb_dir, name)
        if not io.exists(path):
            continue
        emb = io.read_npy(path)
        if rows.size and np.any(emb[rows]):
            emb = np.array(emb)
            emb[rows] = 0
            buf = _io.BytesIO()
            np.save(buf, emb, allow_pickle=False)
            io.write_bytes(buf.getvalue(), path)
            zeroed = max(zeroed, int(rows.size))
    return zeroed


def _needs_scrub(lake: Lake, part: Partition, uids: np.ndarray) -> bool:
    """Whether any stage of the partition still holds a taken-down row unscrubbed (resumes a killed run)."""
    for stage, column, done_value in (("pairs", R.URL, None), ("downloads", R.STATUS, R.STATUS_TAKEN_DOWN),
                                      ("clip", R.STATUS, R.STATUS_TAKEN_DOWN)):
        table = _read_stage(lake, stage, part, (R.UID, column))
        if table is None:
            continue
        hit = pc.is_in(table.column(R.UID), value_set=pa.array(uids, pa.int64()))
        values = _column(table.filter(hit), column, int(pc.sum(hit).as_py() or 0))
        if any(v != done_value for v in values):
            return True
    return False


# --------------------------------------------------------------------------------------------------- releases


def _scrub_release(lake_root: str, name: str, release: dict[str, Any], lists: Mapping[int, str],
                   counts: ScrubCounts) -> bool:
    """Remove taken-down rows from one release's parquet parts and webdataset shards; note it in release.json."""
    from curation.subsets import RELEASE_FILE, subset_dir

    base = join(subset_dir(lake_root, name), release["path"])
    drop = sorted(lists)
    removed = sum(_parquet_without(join(base, part), R.UID, drop) for part in release["parts"])
    members = 0
    for shard in release.get("shards", []):
        index = join(base, shard.removesuffix(".tar") + ".parquet")
        keys: list[str] = []
        if io.exists(index):
            fs, p = io.filesystem(index)
            listing = pq.read_table(p, filesystem=fs)
            if R.UID in listing.column_names:
                hit = pc.fill_null(pc.is_in(listing.column(R.UID), value_set=pa.array(drop, pa.int64())), False)
                keys = listing.filter(hit).column("key").to_pylist()
        if keys:
            members += _tar_without(join(base, shard), set(keys))
            _parquet_without(index, "key", keys)
    if not removed and not members:
        return False
    by_list = Counter(lists[u] for u in drop)
    note = {"removed_rows": removed, "removed_shard_members": members, "lists": dict(by_list),
            "at_unix": round(time.time(), 3)}
    record = {**release, "rows": int(release["rows"]) - removed,
              "takedowns": [*release.get("takedowns", []), note]}
    io.write_json(record, join(base, RELEASE_FILE))
    counts.release_rows += removed
    counts.release_shard_members += members
    return True


def subset_names(lake_root: str) -> list[str]:
    """Every subset with releases in the lake, defined in the registry at hand or not."""
    fs, root = io.filesystem(join(Lake(lake_root).root, "subsets"))
    if not fs.exists(root):
        return []
    names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p)]
    return sorted(n for n in names if not n.startswith(("_", ".")))


def _releases_holding(lake_root: str, name: str, uids: np.ndarray) -> list[dict[str, Any]]:
    from curation.subsets import read_release, release_history

    out = []
    for release in release_history(lake_root, name):
        table = read_release(lake_root, name, release)
        if pc.any(pc.is_in(table.column(R.UID), value_set=pa.array(uids, pa.int64()))).as_py():
            out.append(release)
    return out


# --------------------------------------------------------------------------------------------------- propagate


@dataclass
class PropagationResult:
    taken_down: int  # rows taken down so far
    scrub: ScrubCounts
    dedupe_ran: bool
    index_generation: int | None
    index_removed: int
    subsets: dict[str, dict[str, Any]]  # subset -> {"release": n, "removed_by_reason": {...}} for new releases
    seconds: float
    by_list: dict[str, dict[str, Any]]  # list -> what propagation.json records for it
    timings: dict[str, float] = field(default_factory=dict)  # scrub_s, dedupe_s, index_s, subsets_s


def propagate(lake_root: str, registry: str | None = None) -> PropagationResult:
    """Remove every taken-down row from the tables, shards, embeddings, dedupe, index and subset releases (see the
    module docstring); a no-op when everything is already clean. Records when each list finished propagating in
    `propagation.json` (ingest to complete propagation, per list). `registry`: more subset definitions (besides the
    built-ins and saved searches) whose holding releases get a new release; others are scrubbed in place."""
    started = time.perf_counter()
    table = B.taken_down(lake_root)
    lists = dict(zip(table.column(R.UID).to_pylist(), table.column(B.LIST).to_pylist(), strict=True))
    timings: dict[str, float] = {}

    def timed(step: str, since: float) -> float:
        now = time.perf_counter()
        timings[step] = round(now - since, 3)
        return now

    counts = _scrub_lake(Lake(lake_root), table)
    mark = timed("scrub_s", started)
    dedupe_ran = _rededupe(lake_root, counts)
    mark = timed("dedupe_s", mark)
    generation, index_removed = _update_indexes(lake_root)
    mark = timed("index_s", mark)
    subsets = _update_subsets(lake_root, registry, lists, counts)
    timed("subsets_s", mark)
    by_list = _record_propagation(lake_root, table)
    return PropagationResult(len(lists), counts, dedupe_ran, generation, index_removed, subsets,
                             time.perf_counter() - started, by_list, timings)


def _scrub_lake(lake: Lake, table: pa.Table) -> ScrubCounts:
    """Scrub every partition that still holds a taken-down row (all of them after an ingest; the rest of a killed
    run's after a restart)."""
    counts = ScrubCounts()
    keys = pc.binary_join_element_wise(table.column(R.CRAWL), table.column(R.SEGMENT), "|")
    for key in sorted(set(keys.to_pylist())):
        part = Partition.from_key(key)
        mine = table.filter(pc.equal(keys, key))
        part_lists = dict(zip(mine.column(R.UID).to_pylist(), mine.column(B.LIST).to_pylist(), strict=True))
        if _needs_scrub(lake, part, np.array(list(part_lists), np.int64)):
            _scrub_partition(lake, part, part_lists, counts)
    return counts


def _rededupe(lake_root: str, counts: ScrubCounts) -> bool:
    """Re-run dedupe from its state with the config it was built with (only the scrubbed partitions are re-read)."""
    from curation.dedupe import DedupeConfig, dedupe_lake, state_dir

    state_file = join(state_dir(lake_root), "state.json")
    if not counts.partitions or not io.exists(state_file):
        return False
    config = DedupeConfig(**io.read_json(state_file)["config"])
    dedupe_lake(lake_root, io.finished_partitions(Lake(lake_root).stage_dir("clip")), config)
    return True


def _update_indexes(lake_root: str) -> tuple[int | None, int]:
    """Bring every built index up to date with its own config: (the image index's generation, vectors removed)."""
    from curation.index import IndexConfig, Manifest, build_index

    generation, removed = None, 0
    for modality in ("image", "text"):
        manifest = Manifest.load(lake_root, modality)
        if manifest is None:
            continue
        result = build_index(lake_root, IndexConfig(**manifest.config_shape))
        removed += result.removed
        generation = result.generation if modality == "image" else generation
    return generation, removed


def _update_subsets(lake_root: str, registry: str | None, lists: Mapping[int, str], counts: ScrubCounts
                    ) -> dict[str, dict[str, Any]]:
    """A new release of every defined subset whose latest release held a hit; every holding release scrubbed."""
    from curation.subsets import export_subset, latest_release, load_registry

    uids = np.array(sorted(lists), np.int64)
    subsets: dict[str, dict[str, Any]] = {}
    definitions = {d.name: d for d in load_registry(registry, lake_root)}
    for name in subset_names(lake_root) if uids.size else []:
        holding = _releases_holding(lake_root, name, uids)
        if not holding:
            continue
        latest = latest_release(lake_root, name)
        if name in definitions and latest is not None and any(r["release"] == latest["release"] for r in holding):
            release = export_subset(lake_root, definitions[name])
            subsets[name] = {"release": release.release, "new_release": release.new_release,
                             "removed_by_reason": release.removed_by_reason}
        for held in holding:  # a subset whose definition is not at hand is scrubbed in place, its latest included
            _scrub_release(lake_root, name, held, lists, counts)
    return subsets


def _record_propagation(lake_root: str, table: pa.Table) -> dict[str, dict[str, Any]]:
    """propagation.json: per list, when it was ingested, how many rows it took down (by kind) and when they had
    left every place (now, for lists whose rows were all just propagated)."""
    path = join(B.takedowns_dir(lake_root), B.PROPAGATION_FILE)
    previous = io.read_json(path) if io.exists(path) else {}
    now = round(time.time(), 3)
    out: dict[str, dict[str, Any]] = {}
    for rec in B.list_records(lake_root):
        mine = table.filter(pc.equal(table.column(B.LIST), rec.name))
        by_kind = dict(sorted(Counter(mine.column(B.KIND).to_pylist()).items()))
        before = previous.get(rec.name, {})
        same = before.get("rows") == mine.num_rows
        done_at = before.get("propagated_unix") if same and before.get("propagated_unix") else now
        out[rec.name] = {"reason": rec.reason, "entries": rec.entries, "entries_by_kind": rec.by_kind,
                         "ingested_unix": rec.ingested_unix, "rows": mine.num_rows, "rows_by_kind": by_kind,
                         "propagated_unix": done_at,
                         "ingest_to_propagated_s": round(done_at - rec.ingested_unix, 3)}
    io.write_json(out, path)
    return out


def report(lake_root: str) -> dict[str, Any]:
    """The audit: every list (entries by kind, rows taken down by kind, ingest and propagation times) and where rows
    were removed (partitions, subsets' releases), from the lake alone."""
    path = join(B.takedowns_dir(lake_root), B.PROPAGATION_FILE)
    propagated = io.read_json(path) if io.exists(path) else {}
    table = B.taken_down(lake_root)
    lists = []
    for rec in B.list_records(lake_root):
        mine = table.filter(pc.equal(table.column(B.LIST), rec.name))
        p = propagated.get(rec.name, {})
        pending = p.get("rows") != mine.num_rows
        kinds = Counter(mine.column(B.KIND).to_pylist())
        parts = {f"{c}|{s}" for c, s in zip(mine.column(R.CRAWL).to_pylist(), mine.column(R.SEGMENT).to_pylist(),
                                             strict=True)}
        lists.append({"list": rec.name, "reason": rec.reason, "source": rec.source, "entries": rec.entries,
                      "entries_by_kind": rec.by_kind, "ingested_unix": rec.ingested_unix,
                      "rows": mine.num_rows, "rows_by_kind": dict(sorted(kinds.items())), "partitions": sorted(parts),
                      "propagated": not pending,
                      "ingest_to_propagated_s": None if pending else p.get("ingest_to_propagated_s")})
    return {"lists": lists, "taken_down": table.num_rows}


# ------------------------------------------------------------------------------------------------------ verify


def _shard_uids(lake: Lake, part: Partition) -> set[int]:
    """uids of every sample still in the partition's downloads shards (read from the members' json)."""
    fs, root = io.filesystem(lake.shards_dir(part))
    out: set[int] = set()
    if not fs.exists(root):
        return out
    for path in sorted(str(p) for p in fs.glob(f"{root}/*.tar")):
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    extracted = tar.extractfile(member)
                    uid = json.loads(extracted.read()).get(R.UID) if extracted is not None else None
                    if uid is not None:
                        out.add(int(uid))
    return out


def verify_takedowns(lake_root: str) -> list[str]:
    """Where a taken-down sample still lives (empty when propagation is complete): a table row that still holds
    its data, its image in a shard, a non-zero embedding, a dedupe row, the index, a subset release."""
    from curation.index import index_ids
    from curation.subsets import read_release, release_history

    lake = Lake(lake_root)
    table = B.taken_down(lake_root)
    if table.num_rows == 0:
        return []
    gone = pa.array(table.column(R.UID).to_numpy(), pa.int64())
    problems = []
    keys = pc.binary_join_element_wise(table.column(R.CRAWL), table.column(R.SEGMENT), "|")
    for key in sorted(set(keys.to_pylist())):
        part = Partition.from_key(key)
        uids = table.filter(pc.equal(keys, key)).column(R.UID).to_numpy()
        if _needs_scrub(lake, part, uids):
            problems.append(f"{key}: a stage table still holds taken-down rows")
        dedupe = _read_stage(lake, "dedupe", part, (R.UID,))
        if dedupe is not None and pc.any(pc.is_in(dedupe.column(R.UID), value_set=gone)).as_py():
            problems.append(f"{key}: taken-down rows in dedupe")
        left = _shard_uids(lake, part) & set(uids.tolist())
        if left:
            problems.append(f"{key}: {len(left)} taken-down images still in the downloads shards")
        emb_dir = lake.embeddings_dir(part)
        if io.exists(join(emb_dir, UIDS_FILE)):
            rows = np.isin(io.read_npy(join(emb_dir, UIDS_FILE)).astype(np.int64), uids)
            for name in EMBEDDING_FILES.values():
                if io.exists(join(emb_dir, name)) and np.any(io.open_npy(join(emb_dir, name))[rows]):
                    problems.append(f"{key}: taken-down embeddings in {name}")
    for modality in ("image", "text"):
        try:
            ids = index_ids(lake_root, modality)
        except (FileNotFoundError, ValueError):
            continue
        n = int(pc.sum(pc.is_in(ids.column(R.UID), value_set=gone)).as_py() or 0)
        if n:
            problems.append(f"{modality} index: {n} taken-down uids")
    for name in subset_names(lake_root):
        for release in release_history(lake_root, name):
            rows = read_release(lake_root, name, release)
            n = int(pc.sum(pc.is_in(rows.column(R.UID), value_set=gone)).as_py() or 0)
            if n:
                problems.append(f"subset {name} release {release['release']}: {n} taken-down rows")
    return problems
