"""Every stage as one call that writes its outputs and returns a `StageReport` (curation.report).

The assets call these in the Dagster process (`pairs`, `downloads`, `dedupe`, the subsets) or ship them as jobs
on the compute resource through a Pipes payload (`clip`, `index`; `pairs` and `downloads` too under
CURATION_CPU_STAGES=compute); either way the same function writes the same files and returns the same report:
metadata (counts, rates, charts, galleries), the stage's checks and a log line. The stage modules (`wat`,
`download`, `scoring`, `dedupe`, `index`, `subsets`) hold the logic; this module only runs, verifies and
describes it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import crawls as cc
from curation import io, plots
from curation import records as R
from curation.blocklist import crawl_blocklist
from curation.dedupe import DedupeConfig, DedupeResult, dedupe_lake, verify_dedupe
from curation.download import DownloadConfig, download_images, verify_shards
from curation.gallery import gallery_png, read_sample_image
from curation.index import IndexConfig, IndexResult, build_index, verify_index
from curation.integrity import verify_partition_counts
from curation.layout import STAGE_TABLES, Lake, Partition
from curation.netguard import NetPolicy
from curation.plots import counts_markdown
from curation.report import CheckOutcome, Metadata, StageReport, problems_check
from curation.safety import FLAG_THRESHOLDS
from curation.scoring import ScoreResult, ScoringConfig, score_partition, verify_clip_partition
from curation.subsets import ReleaseResult, SubsetDefinition, export_subset, latest_release, read_release
from curation.wat import TOTALS, ExtractConfig, extract_pairs

# Expected success-rate band on a real crawl: img2dataset users report 98 % (2021) down to 72 % (DataComp)
# and 5-60 % behind proxies. Outside the band the run is fine but somebody should look (WARN).
SUCCESS_RATE_BAND = (0.5, 1.0)
GALLERY_SIZE = 8  # sample tiles in a subset release's metadata


def download_options(options: Mapping[str, Any]) -> tuple[DownloadConfig, NetPolicy]:
    """The download config and network policy from plain options: DownloadConfig's fields plus
    allow_loopback, allow_cidrs and allow_hosts (what the downloader resource holds and a payload receives)."""
    config_fields = {f.name for f in fields(DownloadConfig)}
    unknown = sorted(set(options) - config_fields - {"allow_loopback", "allow_cidrs", "allow_hosts"})
    if unknown:
        raise ValueError(f"unknown download options {unknown}")
    config = DownloadConfig(**{k: v for k, v in options.items() if k in config_fields})
    cidrs, hosts = tuple(options.get("allow_cidrs", ())), tuple(options.get("allow_hosts", ()))
    policy = (NetPolicy.with_loopback(allow_cidrs=cidrs, allow_hosts=hosts) if options.get("allow_loopback")
              else NetPolicy(allow_cidrs=cidrs, allow_hosts=hosts))
    return config, policy


def materialize_pairs(lake_root: str, crawl_root: str, part: Partition) -> StageReport:
    """Extract the partition's pairs from its WAT files into `pairs.parquet` (marker last), deduplicated against
    partitions already in the lake; report counts, throughput and the `uids_unique` check."""
    lake = Lake(lake_root)
    wats = cc.wat_files(crawl_root, part.crawl, part.segment)
    out_dir = lake.partition_dir("pairs", part)
    earlier = io.read_int_column(io.finished_tables(lake.stage_dir("pairs"), STAGE_TABLES["pairs"],
                                                    exclude_dir=out_dir), R.UID)
    started = time.perf_counter()
    result = extract_pairs(wats, crawl=part.crawl, segment=part.segment, config=ExtractConfig(), exclude_uids=earlier,
                           blocklist=crawl_blocklist(lake_root))
    seconds = max(time.perf_counter() - started, 1e-9)
    io.clear_partition(out_dir)
    table_path = lake.table("pairs", part)
    io.write_parquet(result.table, table_path)
    n = result.table.num_rows
    io.write_marker(out_dir, {"rows": n, "counts": result.counts, "wat_files": wats})
    distinct = len(set(result.table.column(R.UID).to_pylist()))
    languages = Counter(result.table.column(R.LANGUAGE).to_pylist())
    dropped = {k: v for k, v in result.counts.items() if v and k not in TOTALS}
    return StageReport(
        metadata={
            "dagster/row_count": ("int", n),
            "dagster/uri": ("path", table_path),
            "wat_files": ("int", len(wats)),
            "records": ("int", result.counts.get("records", 0)),
            "pages": ("int", result.counts.get("pages", 0)),
            "image_links": ("int", result.counts.get("image_links", 0)),
            "dropped_by_reason": ("md", counts_markdown(dropped, "reason")),
            "pairs_per_s": ("float", round(n / seconds, 1)),
            "mb_per_s": ("float", round(result.bytes_read / seconds / 1e6, 2)),
            "languages": ("md", counts_markdown({k or "(none)": v for k, v in languages.items()}, "language")),
        },
        checks=[CheckOutcome("uids_unique", distinct == n, {"rows": ("int", n), "distinct_uids": ("int", distinct)})],
        log=f"{part.key}: {len(wats)} WAT files, {n:,} pairs ({len(earlier):,} uids already in the lake)",
    )


def materialize_downloads(lake_root: str, part: Partition, options: Mapping[str, Any]) -> StageReport:
    """Download the partition's images into webdataset shards and `downloads.parquet` (marker last); report
    counts by status and reason, throughput, and the `success_rate_in_band` / `shards_match_table` checks."""
    lake = Lake(lake_root)
    config, policy = download_options(options)
    out_dir = lake.partition_dir("downloads", part)
    io.require_finished(lake.partition_dir("pairs", part), f"pairs of {part.key}")
    io.remove(lake.marker("downloads", part))  # not complete until the marker is rewritten
    result = download_images(lake.table("pairs", part), out_dir, config, policy, blocklist=crawl_blocklist(lake_root))
    table_path = lake.table("downloads", part)
    io.write_parquet(result.table, table_path)
    problems = verify_shards(result.table, lake.shards_dir(part))
    takedown = sum(n for reason, n in result.counts_by_reason.items() if reason.startswith(R.REASON_TAKEDOWN_PREFIX))
    io.write_marker(out_dir, {"rows": result.table.num_rows, "by_status": result.counts_by_status,
                              "by_reason": result.counts_by_reason, "success_rate": result.success_rate,
                              "blocked_by_takedown": takedown})
    lo, hi = SUCCESS_RATE_BAND
    return StageReport(
        metadata={
            "dagster/row_count": ("int", result.table.num_rows),
            "dagster/uri": ("path", table_path),
            "success_rate": ("float", round(result.success_rate, 4)),
            "images_per_s": ("float", round(result.images_per_s, 1)),
            "duration_s": ("float", round(result.duration_s, 1)),
            "by_status": ("md", counts_markdown(result.counts_by_status, "status")),
            "by_reason": ("md", counts_markdown(result.counts_by_reason, "reason")),
            "blocked_by_takedown": ("int", takedown),
            "shards": ("path", lake.shards_dir(part)),
        },
        checks=[
            CheckOutcome("success_rate_in_band", lo <= result.success_rate <= hi,
                         {"success_rate": ("float", result.success_rate), "band": ("text", str(SUCCESS_RATE_BAND))},
                         warn_only=True),
            CheckOutcome("shards_match_table", not problems,
                         {"problems": ("text", "\n".join(problems) or "none"),
                          "successes": ("int", result.counts_by_status.get(R.STATUS_SUCCESS, 0))}),
        ],
        log=f"{part.key}: {result.counts_by_status} in {result.duration_s:.1f} s",
    )


def materialize_clip(lake_root: str, part: Partition, spec: Mapping[str, Any],
                     clip_options: Mapping[str, Any] | None = None) -> StageReport:
    """Score the partition in one CLIP pass with the models spec (`clip_options`: ClipPassConfig overrides such
    as device, precision, batch_size, num_workers); report counts, speed, model identity, the keep funnel and
    score histograms, and the `embeddings_aligned` check."""
    config = ScoringConfig.from_spec(spec, **(clip_options or {}))
    result = score_partition(lake_root, part, config)
    problems = verify_clip_partition(lake_root, part)
    p = result.clip_pass
    return StageReport(
        metadata=_clip_metadata(result, config),
        checks=[problems_check("embeddings_aligned", problems, embedded=("int", p.n_embedded))],
        log=f"{part.key}: {p.n_embedded} embedded, {p.n_kept} kept with {config.clip.model_name} "
            f"({config.clip.pretrained}), {p.images_per_s:.1f} img/s on {p.device}",
    )


def _clip_metadata(result: ScoreResult, config: ScoringConfig) -> Metadata:
    p = result.clip_pass
    t = result.table
    ok = np.array([s == R.STATUS_OK for s in t.column(R.STATUS).to_pylist()], dtype=bool)

    def values(column: str) -> np.ndarray:
        return np.array([v for v, o in zip(t.column(column).to_pylist(), ok, strict=True) if o and v is not None],
                        dtype=np.float64)

    downloaded = t.num_rows - p.counts_by_status.get(R.STATUS_NOT_DOWNLOADED, 0)
    funnel = [("pairs", t.num_rows), ("downloaded", downloaded), ("embedded", p.n_embedded), ("kept", p.n_kept)]
    charts = [
        plots.markdown_image(plots.funnel_png(funnel, title="keep funnel"), "keep funnel"),
        plots.markdown_image(plots.histogram_png(
            values(R.SIMILARITY), title="image-caption cosine similarity", value_range=(-0.5, 1.0),
            markers=[("en", config.clip.threshold_en), ("other", config.clip.threshold_other)]), "similarity"),
    ]
    ranges = {R.PUNSAFE: (0.0, 1.0), R.PWATERMARK: (0.0, 1.0), R.AESTHETIC: (0.0, 10.0)}
    for kind in result.head_sha256:
        marks = [("flag", FLAG_THRESHOLDS[kind])] if kind in FLAG_THRESHOLDS else []
        charts.append(plots.markdown_image(plots.histogram_png(values(kind), title=kind, value_range=ranges[kind],
                                                               markers=marks), kind))
    return {
        "dagster/row_count": ("int", t.num_rows),
        "dagster/uri": ("path", result.table_path),
        "embedded": ("int", p.n_embedded),
        "kept": ("int", p.n_kept),
        "keep_rate": ("float", round(p.n_kept / p.n_embedded, 4) if p.n_embedded else 0.0),
        "images_per_s": ("float", round(p.images_per_s, 1)),
        "duration_s": ("float", round(result.seconds_total, 1)),
        "device": ("text", f"{p.device} ({p.precision})"),
        R.CLIP_MODEL: ("text", result.clip_model),
        R.CLIP_CHECKPOINT: ("text", result.clip_checkpoint),
        "heads": ("json", dict(result.head_sha256)),
        "thresholds": ("json", {"en": config.clip.threshold_en, "other": config.clip.threshold_other}),
        "by_status": ("md", counts_markdown(p.counts_by_status, "status")),
        "by_reason": ("md", counts_markdown(p.counts_by_reason, "reason")),
        "by_nsfw_tag": ("md", counts_markdown(result.counts_by_tag, R.NSFW_TAG)),
        "flagged": ("json", dict(result.n_flagged)),
        "charts": ("md", "\n\n".join(charts)),
        "embeddings": ("path", p.files.get("img_emb", "")),
    }


def materialize_dedupe(lake_root: str, config: DedupeConfig) -> StageReport:
    """Dedupe every finished `clip` partition (incrementally) and verify the result: clusters, rows against the
    kept clip rows, and row counts along the lineage; with cluster-size charts and a gallery of example clusters."""
    lake = Lake(lake_root)
    parts = io.finished_partitions(lake.stage_dir("clip"))
    result = dedupe_lake(lake_root, parts, config)
    problems = verify_dedupe(lake_root, parts)
    count_problems = verify_partition_counts(lake_root, parts)
    return StageReport(
        metadata=_dedupe_metadata(lake_root, result, config),
        checks=[problems_check("one_survivor_per_cluster", problems["clusters"]),
                problems_check("rows_match_kept_clip", problems["rows"]),
                problems_check("partition_counts_agree", count_problems)],
        log=f"{len(parts)} partitions: {result.nodes} kept pairs, {result.duplicates_removed} duplicates removed in "
            f"{result.duplicate_clusters} clusters; rewrote {len(result.partitions_rewritten)}",
    )


def _dedupe_metadata(lake_root: str, result: DedupeResult, config: DedupeConfig) -> Metadata:
    sizes = sorted(result.cluster_sizes.items())
    gallery_rows = [[(read_sample_image(lake_root, Partition(m.crawl, m.segment), m.shard, m.key)
                      if m.shard is not None and m.key is not None else None, f"{m.segment}/{m.uid % 100000:05d}")
                     for m in cluster] for cluster in result.examples]
    size_chart = plots.funnel_png([(f"size {s}", n) for s, n in sizes if s > 1][:12] or [("no duplicates", 0)],
                                  title="duplicate clusters by size")
    gallery = (plots.markdown_image(gallery_png(gallery_rows, title="example clusters (survivor first)"),
                                    "example clusters") if gallery_rows else "no duplicate clusters")
    return {
        "dagster/row_count": ("int", result.nodes),
        "partitions": ("int", result.partitions),
        "partitions_rewritten": ("json", list(result.partitions_rewritten)),
        "clusters": ("int", result.clusters),
        "duplicate_clusters": ("int", result.duplicate_clusters),
        "duplicates_removed": ("int", result.duplicates_removed),
        "survivors": ("int", result.clusters),
        "by_reason": ("md", counts_markdown(result.by_reason, "reason")),
        "links_by_layer": ("json", result.edges_by_layer),
        "cluster_sizes": ("md", counts_markdown({str(s): n for s, n in sizes}, "size")),
        "charts": ("md", plots.markdown_image(size_chart, "cluster sizes")),
        "gallery": ("md", gallery),
        "radius": ("int", config.radius),
        "duration_s": ("float", round(result.seconds, 2)),
    }


def materialize_index(lake_root: str, config: IndexConfig, *, force_rebuild: bool = False) -> StageReport:
    """Bring the faiss index up to date with the dedupe survivors and verify it (`index_matches_survivors`)."""
    result = build_index(lake_root, config, force_rebuild=force_rebuild)
    problems = verify_index(lake_root, config.modality)
    return StageReport(
        metadata=_index_metadata(result),
        checks=[problems_check("index_matches_survivors", problems, vectors=("int", result.vectors))],
        log=f"{result.factory}: {result.vectors} vectors, recall@{result.k} {result.recall_at_k:.3f} at nprobe "
            f"{result.nprobe}; +{result.added} -{result.removed}"
            + (f"; rebuilt: {result.rebuild_reason}" if result.rebuilt else ""),
    )


def _index_metadata(result: IndexResult) -> Metadata:
    curve = "\n".join(["| nprobe | recall@k |", "|---:|---:|"]
                      + [f"| {k} | {v:.4f} |" for k, v in result.recall_by_nprobe.items()])
    return {
        "dagster/row_count": ("int", result.vectors),
        "factory": ("text", result.factory),
        "family": ("text", result.family),
        "vectors": ("int", result.vectors),
        "dim": ("int", result.dim),
        "nlist": ("int", result.nlist),
        "nprobe": ("int", result.nprobe),
        f"recall_at_{result.k}": ("float", round(result.recall_at_k, 4)),
        "recall_by_nprobe": ("md", curve),
        "query_ms_p50": ("float", round(result.query_ms_p50, 3)),
        "query_ms_p99": ("float", round(result.query_ms_p99, 3)),
        "added": ("int", result.added),
        "removed": ("int", result.removed),
        "rewritten": ("int", result.rewritten),
        "rebuilt": ("bool", result.rebuilt),
        "rebuild_reason": ("text", result.rebuild_reason or "incremental"),
        "unchanged": ("bool", result.unchanged),
        "partitions": ("int", result.partitions),
        "partitions_changed": ("json", result.partitions_changed),
        "index_bytes": ("int", result.index_bytes),
        "clip_model": ("text", f"{result.clip_model} {result.clip_checkpoint}"),
        "generation": ("int", result.generation),
        "build_seconds": ("float", round(result.build_seconds, 2)),
    }


def materialize_subset(lake_root: str, defn: SubsetDefinition, params: Mapping[str, Any] | None = None
                       ) -> StageReport:
    """Export a subset (a new release only when its rows changed) and read the latest release back: counts, the
    diff, a funnel of what each condition passes, histograms, a gallery, `release_consistent` and the
    `score_drift` warning."""
    result = export_subset(lake_root, defn, params)
    release = latest_release(lake_root, defn.name)
    if release is None:
        raise RuntimeError(f"subset {defn.name}: the export wrote no LATEST.json under {lake_root}")
    table = read_release(lake_root, defn.name, release)
    drifted = {k: v for k, v in result.drift.items() if v > defn.drift_max_ks}
    return StageReport(
        metadata=_subset_metadata(lake_root, defn, result, release, table),
        checks=[problems_check("release_consistent", release_problems(release, table)),
                CheckOutcome("score_drift", not drifted, {"ks": ("json", result.drift),
                                                          "threshold": ("float", defn.drift_max_ks)}, warn_only=True)],
        log=f"{defn.name}: release {result.release} ({'new' if result.new_release else 'unchanged'}), "
            f"{result.rows} rows, +{result.added} -{result.removed}",
    )


def release_problems(release: Mapping[str, Any], table: pa.Table) -> list[str]:
    """Problems with a release as read back (its parts' rows against release.json)."""
    problems = []
    if table.num_rows != release["rows"]:
        problems.append(f"parts hold {table.num_rows} rows, release.json says {release['rows']}")
    if pc.count_distinct(table.column(R.UID)).as_py() != table.num_rows:
        problems.append("duplicate uids in the release")
    if pc.sum(pc.is_null(table.column(R.URL))).as_py():
        problems.append("rows without a url")
    return problems


def _subset_metadata(lake_root: str, defn: SubsetDefinition, result: ReleaseResult, release: Mapping[str, Any],
                     table: pa.Table) -> Metadata:
    charts = [plots.funnel_png([("candidates", result.counts["candidates"]),
                                *[(f"{n}", c) for n, c in result.counts["passing"].items()],
                                ("dedupe survivors", result.counts["dedupe_survivors"]),
                                (defn.name, result.rows)], title=f"{defn.name}: what each condition passes")]
    if table.num_rows:
        charts.append(plots.histogram_png(table.column(R.AESTHETIC).to_numpy(zero_copy_only=False),
                                          title="aesthetic score in the release"))
        charts.append(plots.histogram_png(table.column(R.SIMILARITY).to_numpy(zero_copy_only=False),
                                          title="CLIP similarity in the release"))
    return {
        "dagster/row_count": ("int", result.rows),
        "release": ("int", result.release),
        "new_release": ("bool", result.new_release),
        "path": ("path", result.path if result.new_release else release["path"]),
        "digest": ("text", result.digest),
        "previous_release": ("int", result.previous_release if result.previous_release is not None else -1),
        "added": ("int", result.added),
        "removed": ("int", result.removed),
        "added_by_reason": ("md", counts_markdown(result.added_by_reason or {"none": 0}, "reason")),
        "removed_by_reason": ("md", counts_markdown(result.removed_by_reason or {"none": 0}, "reason")),
        "params": ("json", result.params),
        "counts": ("json", result.counts),
        "parts": ("json", result.parts),
        "webdataset_shards": ("int", len(result.shards)),
        "drift_ks": ("json", result.drift),
        "charts": ("md", "\n\n".join(plots.markdown_image(c, "chart") for c in charts)),
        "gallery": ("md", _release_gallery(lake_root, table)),
        "duration_s": ("float", round(result.seconds, 2)),
    }


def _release_gallery(lake_root: str, rows: pa.Table) -> str:
    tiles = [(read_sample_image(lake_root, Partition(r[R.CRAWL], r[R.SEGMENT]), r[R.SOURCE_SHARD], r[R.SOURCE_KEY])
              if r[R.SOURCE_SHARD] and r[R.SOURCE_KEY] else None,
              f"{r[R.AESTHETIC] or 0:.1f} {r[R.ORIGINAL_WIDTH]}px")
             for r in rows.slice(0, GALLERY_SIZE).to_pylist()]
    if not tiles:
        return "empty release"
    return plots.markdown_image(gallery_png([tiles], title="first samples (aesthetic, original width)"), "samples")


def materialize_takedowns(lake_root: str, registry: str | None = None) -> StageReport:
    """Ingest the takedown inbox, match every list against the lake, propagate the removals (curation.takedowns) and
    verify that no taken-down sample remains anywhere (`takedowns_propagated`); an inbox file that is not a valid
    list fails `inbox_lists_valid` (it is moved aside with the reason; the valid ones still propagate)."""
    from curation import takedowns as T
    from curation.blocklist import ListError

    refused = ""
    try:
        ingested = T.ingest_inbox(lake_root)
    except ListError as exc:
        ingested, refused = [], str(exc)
    matched = T.match_lake(lake_root)
    result = T.propagate(lake_root, registry)
    problems = T.verify_takedowns(lake_root)
    audit = T.report(lake_root)
    rows = ["| list | reason | entries | rows taken down | by kind | ingest to propagated |",
            "|---|---|---:|---:|---|---:|"]
    rows += [f"| {x['list']} | {x['reason']} | {x['entries']} | {x['rows']} | {x['rows_by_kind']} | "
             f"{x['ingest_to_propagated_s']} s |" for x in audit["lists"]]
    s = result.scrub
    return StageReport(
        metadata={
            "dagster/row_count": ("int", result.taken_down),
            "lists": ("int", len(audit["lists"])),
            "ingested_now": ("json", [i.record.name for i in ingested if i.new]),
            "newly_matched": ("int", matched.new.num_rows),
            "by_list": ("md", "\n".join(rows)),
            "rows_emptied": ("json", dict(s.rows)),
            "partitions_scrubbed": ("json", s.partitions),
            "shard_members_removed": ("int", s.shard_members),
            "embedding_rows_zeroed": ("int", s.embedding_rows),
            "index_generation": ("int", result.index_generation if result.index_generation is not None else -1),
            "index_removed": ("int", result.index_removed),
            "subset_releases": ("json", result.subsets),
            "release_rows_scrubbed": ("int", s.release_rows),
            "release_shard_members_removed": ("int", s.release_shard_members),
            "duration_s": ("float", round(result.seconds + matched.seconds, 2)),
            "propagation_steps_s": ("json", result.timings),
        },
        checks=[problems_check("takedowns_propagated", problems, taken_down=("int", result.taken_down)),
                CheckOutcome("inbox_lists_valid", not refused, {"refused": ("text", refused or "none")})],
        log=f"{result.taken_down} rows taken down ({matched.new.num_rows} new); emptied {dict(s.rows)}, "
            f"{s.shard_members} shard members, index -{result.index_removed}, releases {result.subsets}",
    )
