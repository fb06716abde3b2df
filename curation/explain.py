"""Provenance of one sample: why it is in the curated set, or at which stage and for what reason it was dropped.

A sample a takedown list took down (curation.blocklist's taken_down.parquet, by uid, or by URL through the sha256
of its URL) is explained as that alone: its uid (or the URL's sha256), `status: taken_down`, the list and when,
from the moment the list is ingested, before the propagation nulls its URL and caption in the lake. A survivor
that was taken down is not named by URL or caption in the dedupe section of its duplicates either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import io
from curation import records as R
from curation.blocklist import LIST, MATCHED_UNIX, URL_SHA256, taken_down, taken_down_lists, url_sha256
from curation.index import MODALITIES, Manifest, index_dir
from curation.layout import STAGE_TABLES, Lake, Partition, join
from curation.phash import to_hex
from curation.sql import connect, connect_kept
from curation.subsets import (
    CANDIDATE_SQL,
    WITH_DEDUPE,
    WITHOUT_DEDUPE,
    SubsetDefinition,
    explain_missing,
    latest_release,
    load_registry,
    subset_candidates,
    subset_dir,
)
from curation.wat import DROP_REASONS, ExtractConfig, resolve_image_url

# The sections of an explanation, in pipeline order; `dropped_at` names a lake stage (pairs, downloads, clip, dedupe).
SECTIONS = ("pairs", "download", "clip", "safety", "dedupe", "index")
SAFETY_COLUMNS = (R.NSFW_TAG, *R.HEAD_KINDS, *R.HEAD_COLUMNS.values())
CLIP_COLUMNS = (R.STATUS, R.ERROR, R.SIMILARITY, R.LANGUAGE_THRESHOLD, R.KEEP, R.REASON, R.CLIP_MODEL,
                R.CLIP_CHECKPOINT, R.PHASH)
# Extraction drops that depend on the page (its alt text, the links before it), not on the URL: the lake counts them
# per partition (the pairs marker's `counts`) but keeps no row saying which URL they were.
PAGE_DROPS = (R.DROP_SHORT_ALT, R.DROP_DUPLICATE, R.DROP_SEEN_BEFORE)
# A subset whose latest release lacks the sample although it passes every condition now: the release predates it.
STALE_RELEASE = "stale_release"
NO_RELEASE = "no_release"
NOT_KEPT = "not_kept"  # curation.subsets.explain_missing's word for a sample the CLIP filter did not keep


class NotInLake(LookupError):
    """The lake holds no trace of the uid or URL asked about (the message says where it looked)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not in the lake"


def explain(lake_root: str, sample: int | str, registry: str | None = None) -> dict[str, Any]:
    """Everything the lake knows about one sample, given by uid (int) or image URL (str), as plain JSON data.

    Returns `{uid, uid_str, url, caption, kept, dropped_at, reason, pairs, download, clip, safety, dedupe, index,
    subsets, matches}`: the verdict (`dropped_at` is the stage that dropped it, `reason` the stage's reason; both
    null for a kept sample; `reason` is `pending_<stage>` while a stage has not run for its partition), one section
    per stage holding the lake's columns (null where the sample never got), and for every registered subset
    (`registry`: a YAML/JSON registry file besides the built-ins and the lake's saved searches) whether its latest
    release includes the sample and, if not, the condition that fails. A URL may match several uids (captions) or
    partitions: the sample that got furthest is explained and `matches` lists every match's verdict (see
    `explain_all` for all of them in full). Raises NotInLake when nothing matches, FileNotFoundError without a lake.
    """
    found = explain_all(lake_root, sample, registry)
    if found[0].get(R.STATUS) == R.STATUS_TAKEN_DOWN:
        return found[0]
    head = dict(found[0])
    head["matches"] = [{k: e[k] for k in ("uid", "crawl", "segment", "kept", "dropped_at", "reason")}
                       for e in found]
    return head


def explain_all(lake_root: str, sample: int | str, registry: str | None = None) -> list[dict[str, Any]]:
    """The explanation (see `explain`, without `matches`) of every (uid, partition) the uid or URL matches, the one
    that got furthest first. A URL the extraction rules refuse (svg, gif, data: …) gets one explanation dropped at
    `pairs`, since no page could have given it to the lake. A taken-down uid or URL gets one explanation that says
    only that (`taken_down_record`)."""
    if not io.exists(lake_root):
        raise FileNotFoundError(f"no lake at {lake_root} (the folder does not exist)")
    gone = taken_down_record(lake_root, sample)
    if gone is not None:
        return [gone]
    con, views = connect(lake_root)
    if "pairs" not in views:
        raise FileNotFoundError(f"the lake at {lake_root} has no finished pairs partitions yet")
    pairs = _find_pairs(con, sample)
    subsets = load_registry(registry, lake_root)
    if not pairs:
        if isinstance(sample, str) and (refused := _url_rule(sample)) is not None:
            return [_extraction_drop(lake_root, sample, refused, subsets)]
        raise NotInLake(_not_found_message(lake_root, sample))
    out = [_explain_pair(lake_root, con, pair, subsets) for pair in pairs]
    return sorted(out, key=lambda e: -_progress(e))  # stable: equals stay in (crawl, segment, uid) order


def taken_down_record(lake_root: str, sample: int | str) -> dict[str, Any] | None:
    """When a takedown list took the uid (or the URL: any row with that URL, as extraction spells it too) down:
    `{uid, uid_str | url_sha256, status: taken_down, list, taken_down_unix}`, the earliest match, nothing else about
    the sample. None otherwise."""
    if isinstance(sample, bool) or not isinstance(sample, int | str):
        return None  # _find_pairs refuses it
    table = taken_down(lake_root)
    if table.num_rows == 0:
        return None
    if isinstance(sample, int):
        key: dict[str, Any] = {"uid": _int64(sample), "uid_str": str(sample)}
        hit = table.filter(pc.equal(table.column(R.UID), pa.scalar(sample, pa.int64())))
    else:
        digests = sorted({url_sha256(u) for u in (sample, _extracted_url(sample)) if u})
        hit = table.filter(pc.is_in(table.column(URL_SHA256), value_set=pa.array(digests, pa.string())))
        key = {URL_SHA256: hit.column(URL_SHA256)[0].as_py()} if hit.num_rows else {}
    if hit.num_rows == 0:
        return None
    first = hit.sort_by([(MATCHED_UNIX, "ascending")]).slice(0, 1).to_pylist()[0]
    return {**key, R.STATUS: R.STATUS_TAKEN_DOWN, LIST: first[LIST], "taken_down_unix": first[MATCHED_UNIX]}


def parse_sample(text: str) -> int | str:
    """A command-line or path argument as a uid (an integer within int64) or else an image URL."""
    body = text.strip()
    return _int64(int(body)) if re.fullmatch(r"-?[0-9]+", body) else text


def _int64(uid: int) -> int:
    if not -(2**63) <= uid < 2**63:
        raise ValueError(f"uid {uid} is outside int64, the range of the lake's uids")
    return uid


# ------------------------------------------------------------------------------------------------------ finding


def _find_pairs(con: duckdb.DuckDBPyConnection, sample: int | str) -> list[dict[str, Any]]:
    """The pairs rows of a uid, or of a URL as given and as extraction spells it (quoted), by crawl, segment, uid."""
    if isinstance(sample, bool) or not isinstance(sample, int | str):
        raise ValueError(f"explain a uid (int) or an image URL (str), got {sample!r}")
    if isinstance(sample, int):
        table = con.sql("SELECT * FROM pairs WHERE uid = $uid ORDER BY crawl, segment",
                        params={"uid": _int64(sample)}).to_arrow_table()
    else:
        spellings = sorted({sample, *([u] if (u := _extracted_url(sample)) else [])})
        table = con.sql("SELECT * FROM pairs WHERE url IN (SELECT UNNEST($urls)) ORDER BY crawl, segment, uid",
                        params={"urls": spellings}).to_arrow_table()
    return _plain_rows(table)


def _extracted_url(url: str) -> str | None:
    """The URL as extraction would have stored it (resolved and quoted), or None if the rules refuse it."""
    return resolve_image_url(url, None, url, ExtractConfig())[0]


def _url_rule(url: str) -> str | None:
    """The extraction rule that refuses this image URL whatever page links it (svg, gif, data_uri, …), or None.
    Judged with ExtractConfig's defaults, the config the pairs stage extracts with."""
    return resolve_image_url(url, None, url, ExtractConfig())[1]


def _stage_row(con: duckdb.DuckDBPyConnection, views: Sequence[str], stage: str, uid: int) -> dict[str, Any] | None:
    """A stage's row for the uid in the connection's one partition (None when the stage has not finished there)."""
    if stage not in views:
        return None
    rows = _plain_rows(con.sql(f'SELECT * FROM "{stage}" WHERE uid = $uid',  # stage: one of STAGE_TABLES
                               params={"uid": uid}).to_arrow_table())
    return rows[0] if rows else None


# ---------------------------------------------------------------------------------------------------- sections


def _explain_pair(lake_root: str, con_all: duckdb.DuckDBPyConnection, pair: dict[str, Any],
                  subsets: Sequence[SubsetDefinition]) -> dict[str, Any]:
    """The explanation of one pairs row: its partition's stage rows, the verdict, index and subsets. A stage's
    section is shown only when the stage before it passed the sample on (a downstream row left from an earlier
    run of a partition whose upstream is being rewritten is not the sample's story)."""
    part, uid = Partition(pair[R.CRAWL], pair[R.SEGMENT]), int(pair[R.UID])
    con, views = connect(lake_root, [part])
    rows = {stage: _stage_row(con, views, stage, uid) for stage in STAGE_TABLES if stage != "pairs"}
    download = rows["downloads"]
    clip = rows["clip"] if download is not None and download.get(R.STATUS) == R.STATUS_SUCCESS else None
    scored = clip is not None and clip.get(R.STATUS) == R.STATUS_OK
    dedupe = rows["dedupe"] if scored and clip is not None and clip.get(R.KEEP) else None
    kept, dropped_at, reason = _verdict(download, clip, dedupe)
    return {
        "uid": uid, "uid_str": str(uid), "url": pair[R.URL], "caption": pair.get(R.TEXT),
        "crawl": part.crawl, "segment": part.segment,
        "kept": kept, "dropped_at": dropped_at, "reason": reason,
        "pairs": pair,
        "download": _without(download, (R.UID, R.CRAWL, R.SEGMENT)),
        "clip": _clip_section(clip),
        "safety": {k: clip.get(k) for k in SAFETY_COLUMNS} if scored and clip is not None else None,
        "dedupe": _dedupe_section(lake_root, con_all, dedupe) if dedupe is not None else None,
        "index": _index_section(lake_root, part, uid) if dedupe is not None else None,
        "subsets": _subsets(lake_root, (part, uid), subsets, clip_kept=bool(clip and clip.get(R.KEEP))),
    }


def _verdict(download: dict[str, Any] | None, clip: dict[str, Any] | None, dedupe: dict[str, Any] | None
             ) -> tuple[bool, str | None, str | None]:
    """(kept, dropped_at, reason): kept means the sample passed every filtering stage and survived dedupe."""
    if download is None:
        return False, None, "pending_downloads"
    if download.get(R.STATUS) != R.STATUS_SUCCESS:
        return False, "downloads", download.get(R.REASON) or download.get(R.STATUS)
    if clip is None:
        return False, None, "pending_clip"
    if clip.get(R.STATUS) != R.STATUS_OK or not clip.get(R.KEEP):
        return False, "clip", clip.get(R.REASON) or clip.get(R.STATUS)
    if dedupe is None:
        return False, None, "pending_dedupe"
    if not dedupe.get(R.SURVIVOR):
        return False, "dedupe", dedupe.get(R.REASON)
    return True, None, None


def _progress(explanation: dict[str, Any]) -> int:
    """How far a sample got: kept first, then by the last section it reached."""
    if explanation["kept"]:
        return len(SECTIONS) + 1
    return max((i for i, s in enumerate(SECTIONS) if explanation.get(s) is not None), default=-1)


def _clip_section(clip: dict[str, Any] | None) -> dict[str, Any] | None:
    """The CLIP pass's verdict on the pair (similarity against its language's threshold), pHash as hex."""
    if clip is None:
        return None
    out = {k: clip.get(k) for k in CLIP_COLUMNS if k in clip}
    phash = out.get(R.PHASH)
    if phash is not None:
        out[R.PHASH] = to_hex(int(phash))
    return out


def _dedupe_section(lake_root: str, con_all: duckdb.DuckDBPyConnection, dedupe: dict[str, Any]) -> dict[str, Any]:
    """The dedupe row, plus where its cluster's survivor (`cluster_id` is its uid) lives and its URL, or, for a
    survivor a takedown list took down, only the list (`survivor_taken_down`)."""
    out = _without(dedupe, (R.UID, R.CRAWL, R.SEGMENT)) or {}
    survivor = dedupe.get(R.CLUSTER_ID)
    out["survivor_uid"] = survivor
    if survivor is None or dedupe.get(R.SURVIVOR):
        return out
    gone = taken_down_lists(lake_root, [int(survivor)])
    if gone:
        out["survivor_taken_down"] = gone[int(survivor)]
    else:
        rows = con_all.execute(
            "SELECT d.crawl, d.segment, p.url, p.text FROM dedupe d JOIN pairs p USING (uid, crawl, segment) "
            "WHERE d.uid = $uid AND d.survivor ORDER BY d.crawl, d.segment", {"uid": int(survivor)}).fetchall()
        if rows:
            crawl, segment, url, text = rows[0]
            out |= {"survivor_crawl": crawl, "survivor_segment": segment, "survivor_url": url,
                    "survivor_caption": text}
    return out


def _index_section(lake_root: str, part: Partition, uid: int) -> dict[str, Any] | None:
    """Whether the uid (from this partition) is in each committed index generation; None before any index."""
    out: dict[str, Any] = {}
    for modality in MODALITIES:
        manifest = Manifest.load(lake_root, modality)
        if manifest is None:
            continue
        fs, path = io.filesystem(join(index_dir(lake_root, modality), manifest.ids_file))
        ids = pq.read_table(path, filesystem=fs, columns=[R.UID, R.CRAWL, R.SEGMENT], filters=[(R.UID, "==", uid)])
        held = (part.crawl, part.segment) in set(zip(ids.column(R.CRAWL).to_pylist(),
                                                     ids.column(R.SEGMENT).to_pylist(), strict=True))
        prefix = "" if modality == "image" else f"{modality}_"
        out |= {f"{prefix}modality": modality, f"{prefix}generation": manifest.generation,
                f"in_{prefix}index": held, f"{prefix}vectors": manifest.vectors}
    return out or None


# ------------------------------------------------------------------------------------------------------ subsets


def _subsets(lake_root: str, sample: tuple[Partition, int] | None, subsets: Sequence[SubsetDefinition], *,
             clip_kept: bool) -> list[dict[str, Any]]:
    """For every subset: its latest release, whether that release holds the sample (a partition and uid; None for
    a sample that never reached the lake), and if not the failing condition (curation.subsets.explain_missing,
    evaluated with the release's own definition and parameters; `no_release` before the first export)."""
    sandbox: dict[str, duckdb.DuckDBPyConnection] = {}  # this sample's candidates, built once if a subset needs it
    out = []
    for registered in subsets:
        release = latest_release(lake_root, registered.name)
        included, failing = False, NO_RELEASE if release is None else None
        if release is not None and (sample is None or not clip_kept):
            failing = NOT_KEPT
        elif release is not None and sample is not None:
            included = _in_release(lake_root, registered.name, release, *sample)
            if not included:
                failing = _failing_condition(lake_root, registered, release, *sample, sandbox)
        out.append({"name": registered.name, "release": None if release is None else release["release"],
                    "included": included, "failing_condition": failing})
    return out


def _failing_condition(lake_root: str, registered: SubsetDefinition, release: dict[str, Any], part: Partition,
                       uid: int, sandbox: dict[str, duckdb.DuckDBPyConnection]) -> str:
    """Why a kept sample is not in a release: explain_missing's answer, `stale_release` when it passes now."""
    defn = _released_definition(registered, release)
    if defn.query is not None:  # a saved search: its matches come from the whole index generation
        con = subset_candidates(lake_root, defn)[0]
    else:
        if "sample" not in sandbox:
            sandbox["sample"] = _sample_candidates(lake_root, part, uid)
        con = sandbox["sample"]
    why = explain_missing(con, defn, release.get("params") or {}, [uid])[uid]
    return STALE_RELEASE if why == "unchanged" else why


def _released_definition(registered: SubsetDefinition, release: dict[str, Any]) -> SubsetDefinition:
    """The definition the release was made with (its release.json), else the registered one."""
    try:
        return SubsetDefinition.from_mapping(release["definition"])
    except (KeyError, TypeError, ValueError):
        return registered


def _in_release(lake_root: str, name: str, release: dict[str, Any], part: Partition, uid: int) -> bool:
    """Whether a release's parts hold the uid from this partition (only the uid's rows are read)."""
    base = join(subset_dir(lake_root, name), release["path"])
    for part_file in release["parts"]:
        fs, path = io.filesystem(join(base, part_file))
        rows = pq.read_table(path, filesystem=fs, columns=[R.UID, R.CRAWL, R.SEGMENT], filters=[(R.UID, "==", uid)])
        if (part.crawl, part.segment) in set(zip(rows.column(R.CRAWL).to_pylist(), rows.column(R.SEGMENT).to_pylist(),
                                                 strict=True)):
            return True
    return False


def _sample_candidates(lake_root: str, part: Partition, uid: int) -> duckdb.DuckDBPyConnection:
    """The subsets' sandbox (curation.subsets.sandboxed_candidates) holding only this sample's candidate row: views
    over its one partition, the `candidates` table of CANDIDATE_SQL for the uid, then views dropped and external
    access off, so a registry condition evaluates exactly as at export."""
    con, views = connect_kept(lake_root, [part])
    cols, joins = WITH_DEDUPE if "dedupe" in views else WITHOUT_DEDUPE
    con.execute("CREATE TABLE candidates AS " + CANDIDATE_SQL.format(dedupe_columns=cols, dedupe_join=joins)
                + " WHERE k.uid = $uid", {"uid": uid})
    for view in views:
        con.execute(f'DROP VIEW "{view}"')  # fixed names: the stages' and `kept`
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


# --------------------------------------------------------------------------------------------- extraction drops


def _extraction_drop(lake_root: str, url: str, reason: str, subsets: Sequence[SubsetDefinition]
                     ) -> dict[str, Any]:
    """The explanation of a URL the extraction rules refuse: dropped at `pairs`, with how many links the lake's
    finished pairs partitions dropped for that reason (the lake counts extraction drops; it keeps no row per link)."""
    counts = _drop_counts(lake_root)
    return {
        "uid": None, "uid_str": None, "url": url, "caption": None, "crawl": None, "segment": None,
        "kept": False, "dropped_at": "pairs", "reason": reason,
        "pairs": {R.URL: url, R.REASON: reason, "dropped_for_reason": counts.get(reason, 0),
                  "partitions": counts.get("partitions", 0), "recorded_as": "counts in the pairs markers"},
        **dict.fromkeys(SECTIONS[1:]),
        "subsets": _subsets(lake_root, None, subsets, clip_kept=False),
    }


def _drop_counts(lake_root: str) -> dict[str, int]:
    """Extraction drops by reason summed over the finished pairs partitions (their markers), and `partitions`."""
    lake = Lake(lake_root)
    totals: dict[str, int] = {"partitions": 0}
    for part in io.finished_partitions(lake.stage_dir("pairs")):
        marker = io.read_marker(lake.partition_dir("pairs", part)) or {}
        totals["partitions"] += 1
        for reason, n in (marker.get("counts") or {}).items():
            if reason in DROP_REASONS:
                totals[reason] = totals.get(reason, 0) + int(n)
    return totals


def _not_found_message(lake_root: str, sample: int | str) -> str:
    counts = _drop_counts(lake_root)
    where = f"{counts['partitions']} finished pairs partitions of {lake_root}"
    if isinstance(sample, int):
        return (f"uid {sample} is in none of the {where} (a uid is LAION's hash of url + caption, "
                "curation.wat.laion_uid)")
    page = ", ".join(f"{r} {counts.get(r, 0)}" for r in PAGE_DROPS)
    return (f"no pair with url {sample!r} in the {where}. The extraction rules accept the URL, so no crawled page "
            f"linked it, or each link was dropped for a reason that depends on its page, which the lake counts but "
            f"does not record per URL ({page})")


# -------------------------------------------------------------------------------------------------- plain JSON


def _plain_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as JSON-plain dicts: float32 columns at their shortest decimal (0.28, not 0.2800000011920929), which
    keeps their order, and NaN or infinity as null."""
    float32 = {f.name for f in table.schema if pa.types.is_float32(f.type)}
    rows = table.to_pylist()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = (None if not math.isfinite(value)
                            else float(str(np.float32(value))) if key in float32 else value)
    return rows


def _without(row: dict[str, Any] | None, keys: Sequence[str]) -> dict[str, Any] | None:
    return None if row is None else {k: v for k, v in row.items() if k not in keys}
