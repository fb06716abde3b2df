"""The CPU stages of one partition as single calls: extract its pairs, download its images.

The `pairs` and `downloads` assets call these in the Dagster process, or ship them as SLURM jobs through a
Pipes payload (`assets/payloads/cpu_stage.py`); either way the same function writes the same files and
returns the same `StageReport`, whose metadata and check results are plain typed values that both Dagster
and Dagster Pipes can carry.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from curation import crawls as cc
from curation import io, records
from curation.download import DownloadConfig, download_images, verify_shards
from curation.layout import STAGE_TABLES, Lake, Partition
from curation.netguard import NetPolicy
from curation.plots import counts_markdown
from curation.wat import ExtractConfig, extract_pairs

# Expected success-rate band on a real crawl: img2dataset users report 98 % (2021) down to 72 % (DataComp)
# and 5-60 % behind proxies. Outside the band the run is fine but somebody should look (WARN).
SUCCESS_RATE_BAND = (0.5, 1.0)
_TOTALS = ("records", "pages", "image_links", "kept")
METADATA_TYPES = ("int", "float", "text", "md", "path", "json", "bool")


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    metadata: dict[str, tuple[str, Any]] = field(default_factory=dict)
    warn_only: bool = False


@dataclass(frozen=True)
class StageReport:
    """Materialization metadata as {key: (type, value)} with type in METADATA_TYPES, plus check outcomes."""

    metadata: dict[str, tuple[str, Any]]
    checks: list[CheckOutcome]
    log: str = ""


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
                                                    exclude_dir=out_dir), records.UID)
    started = time.perf_counter()
    result = extract_pairs(wats, crawl=part.crawl, segment=part.segment, config=ExtractConfig(), exclude_uids=earlier)
    seconds = max(time.perf_counter() - started, 1e-9)
    io.clear_partition(out_dir)
    table_path = lake.table("pairs", part)
    io.write_parquet(result.table, table_path)
    n = result.table.num_rows
    io.write_marker(out_dir, {"rows": n, "counts": result.counts, "wat_files": wats})
    distinct = len(set(result.table.column(records.UID).to_pylist()))
    languages = Counter(result.table.column(records.LANGUAGE).to_pylist())
    dropped = {k: v for k, v in result.counts.items() if v and k not in _TOTALS}
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
    result = download_images(lake.table("pairs", part), out_dir, config, policy)
    table_path = lake.table("downloads", part)
    io.write_parquet(result.table, table_path)
    problems = verify_shards(result.table, lake.shards_dir(part))
    io.write_marker(out_dir, {"rows": result.table.num_rows, "by_status": result.counts_by_status,
                              "by_reason": result.counts_by_reason, "success_rate": result.success_rate})
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
            "shards": ("path", lake.shards_dir(part)),
        },
        checks=[
            CheckOutcome("success_rate_in_band", lo <= result.success_rate <= hi,
                         {"success_rate": ("float", result.success_rate), "band": ("text", str(SUCCESS_RATE_BAND))},
                         warn_only=True),
            CheckOutcome("shards_match_table", not problems,
                         {"problems": ("text", "\n".join(problems) or "none"),
                          "successes": ("int", result.counts_by_status.get(records.STATUS_SUCCESS, 0))}),
        ],
        log=f"{part.key}: {result.counts_by_status} in {result.duration_s:.1f} s",
    )


def pipes_metadata(metadata: Mapping[str, tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    """{key: (type, value)} as Dagster Pipes' {"raw_value", "type"} form."""
    return {k: {"raw_value": v, "type": t} for k, (t, v) in metadata.items()}
